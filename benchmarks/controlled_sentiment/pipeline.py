"""
The stages of the offline controlled-sentiment experiment (TDPO paper §5.1, Fig. 3, at CPU scale).

1. [`build_tokenizer`] / [`build_model`]: a byte-level BPE tokenizer trained on the synthetic review language and a
   randomly initialised small Llama, both seeded.
2. [`train_sft`]: supervised training of that model from scratch on synthetic reviews of mixed sentiment: the SFT
   model, which is also the reference π_ref of every method (the paper's `gpt2-large-IMDb-fine-tuned`).
3. [`sample_preference_pairs`]: K completions per prompt sampled from the SFT model, labelled by the programmatic
   reward (chosen = higher reward), as the DPO paper built its IMDb pairs.
4. [`train_method`]: one preference-optimisation run (DPO, TDPO1, TDPO2, TGDPO, TBPO-A or TBPO-Q) at one β, evaluated
   every few steps on held-out prompts by [`trl_tokenpref.evaluation.GenerationEvalCallback`] (reward, sequential KL,
   entropy, distinct-n, and the chosen/rejected sequential KL on fixed held-out pairs).

`run.py` chains them and writes the report (`report.py`).
"""

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from trl_tokenpref.evaluation import GenerationEvalCallback, evaluate_policy, generate_completions
from trl_tokenpref.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

from .language import batch_sentiment_reward, make_prompts, make_sft_corpus, sentiment_reward, tokenizer_corpus


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    """Every setting of the experiment. The defaults are the full run; [`quick_config`] shrinks them for smoke tests."""

    seed: int = 0
    # The whole pipeline (SFT, pairs, preference runs) is repeated for each seed; `seed` is the one a stage runs with
    seeds: tuple[int, ...] = (0, 1, 2)
    # Tokenizer and model
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # SFT stage
    sft_reviews: int = 20000
    sft_steps: int = 800
    sft_batch_size: int = 32
    sft_learning_rate: float = 3e-3
    # Preference data: `pair_prompt_draws` train prompts (with repetition), `samples_per_prompt` completions each
    pair_prompt_draws: int = 1600
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    num_held_out_prompts: int = 64
    num_eval_pairs: int = 64
    # Preference optimisation
    methods: tuple[str, ...] = (
        "dpo",
        "tdpo1",
        "tdpo2_a0.5",
        "tdpo2_a1",
        "tdpo2_a2",
        "tgdpo",
        "tbpo_a",
        "tbpo_q",
        "tbpo_a_floor",
        "tbpo_q_floor",
    )
    betas: tuple[float, ...] = (0.05, 0.1, 0.5)
    max_steps: int = 200
    batch_size: int = 16
    learning_rate: float = 2e-4
    eval_every: int = 25
    eval_samples_per_prompt: int = 3
    # TGDPO's guidance: the DPO model trained at this β (must be one of `betas`)
    guidance_beta: float = 0.1
    tgdpo_alpha: float = 0.5
    # β whose runs are drawn in the chosen/rejected sequential-KL figure (the paper's DPO β)
    curves_beta: float = 0.1
    # The TBPO stabilisers (docs/tbpo_trainer.md): `*_floor` methods set `log_ratio_floor=tbpo_floor`, `*_lam` methods
    # the generator SBA(λ = tbpo_stable_lambda); they run at the β in `stabiliser_betas` only (where TBPO drifts)
    tbpo_floor: float = -0.1
    # Instead of the one `tbpo_floor`, a variant's floor can scale with β: `-contrast × β`, a bound of `contrast` nats
    # on each token's contrast ρ^l − ρ^w (log R_t = β[(ρ^l_t − ρ^w_t) + ...], docs/algorithms.md §4); None: `tbpo_floor`
    tbpo_a_floor_contrast: float | None = None
    tbpo_q_floor_contrast: float | None = None
    tbpo_stable_lambda: float = -0.5
    stabiliser_betas: tuple[float, ...] = (0.05, 0.1)
    # Parallelism: preference runs in `workers` processes of `threads_per_worker` torch threads each
    workers: int = 2
    threads_per_worker: int = 1
    # torch threads of the main process (SFT, pair sampling); None: workers × threads_per_worker. On a machine shared
    # with other jobs, 1 avoids the slowdown of oversubscribed OpenMP threads
    main_threads: int | None = None
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quick_config(**overrides) -> ExperimentConfig:
    """Tiny sizes and a handful of steps: the whole pipeline in well under a minute on one thread."""
    config = ExperimentConfig(
        vocab_size=320,
        hidden_size=48,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        sft_reviews=400,
        sft_steps=150,
        sft_batch_size=16,
        sft_learning_rate=1e-2,
        pair_prompt_draws=24,
        samples_per_prompt=2,
        max_new_tokens=16,
        num_held_out_prompts=8,
        num_eval_pairs=4,
        seeds=(0,),
        betas=(0.1,),
        stabiliser_betas=(0.1,),
        max_steps=2,
        batch_size=4,
        eval_every=1,
        eval_samples_per_prompt=1,
        workers=1,
        quick=True,
    )
    return replace(config, **overrides)


# ------------------------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------------------------

METHOD_LABELS = {
    "dpo": "DPO",
    "tdpo1": "TDPO1",
    "tdpo2_a0.5": "TDPO2 (α=0.5)",
    "tdpo2_a1": "TDPO2 (α=1)",
    "tdpo2_a2": "TDPO2 (α=2)",
    "tgdpo": "TGDPO (α=0.5, DPO guide)",
    "tbpo_a": "TBPO-A",
    "tbpo_q": "TBPO-Q",
    "tbpo_a_floor": "TBPO-A + log R floor",
    "tbpo_q_floor": "TBPO-Q + log R floor",
}
# Also runnable by name (`--methods`), not in the default run: the λ < 0 generator, which the stabiliser measurements
# rejected (docs/tbpo_trainer.md)
EXTRA_METHOD_LABELS = {"tbpo_a_lam": "TBPO-A, SBA(λ<0)", "tbpo_q_lam": "TBPO-Q, SBA(λ<0)"}
# Methods that only run at `ExperimentConfig.stabiliser_betas`
STABILISED_METHODS = ("tbpo_a_floor", "tbpo_q_floor", "tbpo_a_lam", "tbpo_q_lam")


def method_betas(method: str, config: "ExperimentConfig") -> tuple[float, ...]:
    """The β grid of `method`: the stabilised TBPO variants run at `stabiliser_betas` (where the plain ones drift), a
    plain TBPO variant whose stabilised version runs also there (so that the two are compared at the same β), the rest
    at `betas`."""
    if method in STABILISED_METHODS:
        return tuple(config.stabiliser_betas)
    if any(f"{method}_{kind}" in config.methods for kind in ("floor", "lam")):
        return tuple(sorted(set(config.betas) | set(config.stabiliser_betas)))
    return tuple(config.betas)


def method_label(method: str) -> str:
    """The display name of `method` (its id if it has none)."""
    return METHOD_LABELS.get(method) or EXTRA_METHOD_LABELS.get(method, method)


def method_available(method: str) -> tuple[bool, str]:
    """Whether the trainer of `method` can be imported now, and the import error if not."""
    try:
        _trainer_and_config(method)
    except ImportError as error:
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def tbpo_floor_at(config: "ExperimentConfig", variant: str, beta: float) -> float:
    """The `log_ratio_floor` of a `{variant}_floor` run at `beta`: `-contrast × β` when the variant has a contrast
    bound (`tbpo_a_floor_contrast` / `tbpo_q_floor_contrast`), the absolute `tbpo_floor` otherwise."""
    contrast = getattr(config, f"{variant}_floor_contrast")
    return config.tbpo_floor if contrast is None else -contrast * beta


def _trainer_and_config(method: str, config: "ExperimentConfig | None" = None, beta: float = 0.1):
    """The trainer class, config class and method-specific config arguments of `method` at `beta` (the stabilised
    TBPO variants read their setting from `config`, the defaults if None)."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, {}
    if method == "tdpo1":
        from trl_tokenpref.tdpo import TDPOConfig, TDPOTrainer

        return TDPOTrainer, TDPOConfig, {"variant": "tdpo1"}
    if method.startswith("tdpo2_a"):
        from trl_tokenpref.tdpo import TDPOConfig, TDPOTrainer

        return TDPOTrainer, TDPOConfig, {"variant": "tdpo2", "alpha": float(method.removeprefix("tdpo2_a"))}
    if method == "tgdpo":
        from trl_tokenpref.tgdpo import TGDPOConfig, TGDPOTrainer

        return TGDPOTrainer, TGDPOConfig, {}
    if method in ("tbpo_a", "tbpo_q"):
        from trl_tokenpref.tbpo import TBPOConfig, TBPOTrainer

        return TBPOTrainer, TBPOConfig, {"variant": method}
    if method in STABILISED_METHODS:
        from trl_tokenpref.tbpo import TBPOConfig, TBPOTrainer

        config = config or ExperimentConfig()
        variant, stabiliser = method.rsplit("_", 1)
        if stabiliser == "floor":
            return (
                TBPOTrainer,
                TBPOConfig,
                {"variant": variant, "log_ratio_floor": tbpo_floor_at(config, variant, beta)},
            )
        return TBPOTrainer, TBPOConfig, {"variant": variant, "generator_lambda": config.tbpo_stable_lambda}
    raise ValueError(f"Unknown method {method!r}; expected one of {list(METHOD_LABELS) + list(EXTRA_METHOD_LABELS)}.")


# ------------------------------------------------------------------------------------------------------------------
# Stage 1: tokenizer and model
# ------------------------------------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the review language, with the special tokens of `trl_tokenpref.tiny`.

    Plain-text prompts are used (TRL's standard format), so the chat template is only there for completeness. Left
    padding is what generation needs; TRL's collators pad on their own.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(config: ExperimentConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A randomly initialised Llama causal LM, seeded, without touching the caller's RNG state."""
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AutoModelForCausalLM.from_config(llama_config, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# Stage 2: SFT from scratch
# ------------------------------------------------------------------------------------------------------------------


def train_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    reviews: list[tuple[str, str]],
    config: ExperimentConfig,
    log_every: int = 200,
) -> list[dict[str, float]]:
    """
    Trains `model` in place as a language model of whole reviews (opening and continuation, then EOS).

    A plain PyTorch loop: batches drawn with a seeded generator, AdamW, linear warm-up then cosine decay to a tenth of
    the peak rate. The loss covers every token (the prompts are part of the language), so the model learns where
    reviews end as well as how they go on.

    Returns:
        `list[dict]`: The logged `{"step", "loss"}` points (loss averaged since the previous point).
    """
    eos = tokenizer.eos_token_id
    encoded = [
        tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [eos] for prompt, completion in reviews
    ]
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.sft_learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = max(1, config.sft_steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.sft_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    model.train()
    history, running = [], []
    for step in range(config.sft_steps):
        indices = torch.randint(len(encoded), (config.sft_batch_size,), generator=generator).tolist()
        rows = [encoded[i] for i in indices]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == config.sft_steps:
            history.append({"step": step + 1, "loss": sum(running) / len(running)})
            running = []
    model.eval()
    return history


# ------------------------------------------------------------------------------------------------------------------
# Stage 3: preference pairs from the SFT model
# ------------------------------------------------------------------------------------------------------------------


def sample_preference_pairs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    num_prompt_draws: int,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """
    Preference pairs labelled by the reward, from completions sampled from the SFT model.

    `num_prompt_draws` prompts are drawn (with repetition) from `prompts`; each gets `samples_per_prompt` completions
    (ancestral sampling, temperature 1). Within a prompt the completions are sorted by reward and paired from the
    outside in (best with worst, second best with second worst, ...), so every completion is used once and each pair
    has the largest margins available; pairs with equal rewards are dropped. Chosen is the higher reward.

    Returns:
        `tuple[list[dict], dict]`: Rows `{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}` in TRL's
        standard format (completions start with a space, as generated), and statistics of the data.
    """
    rng = random.Random(seed)
    drawn = [rng.choice(prompts) for _ in range(num_prompt_draws)]
    generations = generate_completions(
        model,
        tokenizer,
        drawn,
        max_new_tokens=max_new_tokens,
        seed=seed,
        num_samples_per_prompt=samples_per_prompt,
        batch_size=256,
    )
    eos = tokenizer.eos_token_id
    rows, ties, truncated = [], 0, 0
    for index, prompt in enumerate(drawn):
        group = range(index * samples_per_prompt, (index + 1) * samples_per_prompt)
        samples = []
        for i in group:
            truncated += not (generations.completion_ids[i] and generations.completion_ids[i][-1] == eos)
            samples.append((sentiment_reward(generations.texts[i]), generations.texts[i]))
        samples.sort(key=lambda sample: sample[0], reverse=True)
        for k in range(samples_per_prompt // 2):
            (high, chosen), (low, rejected) = samples[k], samples[-1 - k]
            if high == low or not chosen.strip() or not rejected.strip():
                ties += 1
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reward": high,
                    "rejected_reward": low,
                }
            )
    stats = {
        "pairs": len(rows),
        "dropped_ties": ties,
        "samples": len(generations),
        "truncated_samples": truncated,
        "sample_reward_mean": sum(sentiment_reward(text) for text in generations.texts) / max(1, len(generations)),
        "chosen_reward_mean": sum(row["chosen_reward"] for row in rows) / max(1, len(rows)),
        "rejected_reward_mean": sum(row["rejected_reward"] for row in rows) / max(1, len(rows)),
    }
    return rows, stats


# ------------------------------------------------------------------------------------------------------------------
# Stage 4: one preference-optimisation run
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything a (possibly separate) worker process needs to train one method at one β."""

    method: str
    beta: float
    sft_path: str
    data_dir: str
    output_dir: str
    config: dict
    guidance_path: str | None = None
    save_model: bool = False


def train_method(spec: RunSpec) -> dict:
    """
    Trains `spec.method` at `spec.beta` from the SFT model and evaluates it every `eval_every` steps.

    Every method gets the same data order (same seed), the same reference (the SFT model), the same optimiser settings
    and the same evaluation (prompts, sampling seed, held-out pairs), so differences come from the loss alone. The
    step-0 point (the SFT model itself) is evaluated once by the caller, not here.

    Returns:
        `dict`: `method`, `beta`, `evals` (the callback's history: one dict of metrics per evaluation), `train_logs`
        (the trainer's log history without the evaluation entries), `wall_time_s`, `cpu_time_s`.
    """
    import datasets
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()
    config = config_from_dict(spec.config)
    torch.set_num_threads(config.threads_per_worker)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer_class, config_class, method_kwargs = _trainer_and_config(spec.method, config, spec.beta)
    data = datasets.load_from_disk(spec.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(spec.sft_path)
    train_pairs = data["train"].select_columns(["prompt", "chosen", "rejected"])
    eval_pairs = [(row["prompt"], row["chosen"], row["rejected"]) for row in data["eval_pairs"]]
    held_out_prompts = list(data["held_out_prompts"]["prompt"])

    if spec.method == "tgdpo":
        method_kwargs = {**method_kwargs, "alpha": config.tgdpo_alpha}
    args = config_class(
        output_dir=spec.output_dir,
        beta=spec.beta,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=config.eval_every,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=config.seed,
        dataloader_num_workers=0,
        **method_kwargs,
    )
    reference = AutoModelForCausalLM.from_pretrained(spec.sft_path)
    callback = GenerationEvalCallback(
        reference,
        tokenizer,
        held_out_prompts,
        batch_sentiment_reward,
        every_n_steps=config.eval_every,
        eval_on_start=False,
        preference_pairs=eval_pairs,
        max_new_tokens=config.max_new_tokens,
        num_samples_per_prompt=config.eval_samples_per_prompt,
        seed=config.seed + 1,
        batch_size=128,
    )
    extra = {}
    if spec.method == "tgdpo":
        extra["guidance_model"] = spec.guidance_path
    trainer = trainer_class(
        model=spec.sft_path,
        args=args,
        train_dataset=train_pairs,
        processing_class=tokenizer,
        callbacks=[callback],
        **extra,
    )
    trainer.remove_callback(PrinterCallback)
    callback.attach(trainer)
    trainer.train()
    if spec.save_model:
        trainer.save_model(spec.output_dir)
    train_logs = [log for log in trainer.state.log_history if not any(key.startswith("eval_gen/") for key in log)]
    return {
        "method": spec.method,
        "beta": spec.beta,
        "evals": callback.history,
        "train_logs": train_logs,
        "wall_time_s": time.perf_counter() - start,
        # CPU time of this process: unlike the wall time, not inflated by other processes sharing the cores
        "cpu_time_s": time.process_time() - cpu_start,
    }


def config_from_dict(values: dict) -> ExperimentConfig:
    """An `ExperimentConfig` from its `asdict` form (JSON turns the tuples into lists)."""
    tuples = {key: tuple(values[key]) for key in ("methods", "betas", "stabiliser_betas", "seeds") if key in values}
    return ExperimentConfig(**{**values, **tuples})


def evaluate_sft(sft_path: str, data_dir: str, config: ExperimentConfig) -> dict:
    """The step-0 point shared by every run: the SFT model against itself (KL 0), with the same evaluation settings
    as [`train_method`]'s callback."""
    import datasets

    data = datasets.load_from_disk(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_path)
    policy = AutoModelForCausalLM.from_pretrained(sft_path)
    reference = AutoModelForCausalLM.from_pretrained(sft_path)
    metrics = evaluate_policy(
        policy,
        reference,
        tokenizer,
        list(data["held_out_prompts"]["prompt"]),
        batch_sentiment_reward,
        max_new_tokens=config.max_new_tokens,
        num_samples_per_prompt=config.eval_samples_per_prompt,
        seed=config.seed + 1,
        batch_size=128,
        preference_pairs=[(row["prompt"], row["chosen"], row["rejected"]) for row in data["eval_pairs"]],
    )
    return {"step": 0, **metrics}


def held_out_prompts(config: ExperimentConfig) -> tuple[list[str], list[str]]:
    """The train and held-out prompts of the experiment."""
    return make_prompts(seed=config.seed, num_held_out=config.num_held_out_prompts)


def sft_corpus(config: ExperimentConfig, train_prompts: list[str]) -> list[tuple[str, str]]:
    """The SFT reviews (seeded from the experiment seed)."""
    return make_sft_corpus(train_prompts, config.sft_reviews, seed=config.seed)
