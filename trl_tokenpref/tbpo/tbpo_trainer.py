import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from .._logging import get_logger
from ..base import TokenLevelDPOTrainer
from ..losses import Metric, center_log_weights, sequential_kl_metrics, tbpo_loss
from ..token_batch import TokenBatch
from .baseline_head import (
    BASELINE_HEAD_NAME,
    BASELINE_OPTIMIZER_NAME,
    BaselineHead,
    load_baseline_head,
    save_baseline_head,
)
from .tbpo_config import TBPOConfig


logger = get_logger(__name__)


class _BaselineHeadCallback(TrainerCallback):
    """Steps the TBPO-Q head's optimizer whenever the policy's optimizer steps, i.e. once per gradient-accumulation
    cycle. `on_pre_optimizer_step` runs after the policy's gradients are clipped and before its optimizer (and, under
    fp16, the gradient scaler's update) steps, so the loss scale the head's gradients carry is still the current one."""

    def __init__(self, trainer: "TBPOTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._baseline_optimizer_step()


class TBPOTrainer(TokenLevelDPOTrainer):
    r"""
    Trainer for Token-level Bregman Preference Optimization (TBPO), from "TokenRatio: Principled Token-Level Preference
    Optimization via Ratio Matching" (ICML 2026, [paper](https://huggingface.co/papers/2605.12288)).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, same dataset formats, same metrics. Instead of one
    Bradley–Terry comparison per pair, TBPO compares the two completions token by token, at every completion index
    t ≤ T = min(n_w, n_l) (aligned by completion index, not by column), through the token ratio

        log R_t = β[(ρ^l_t − ρ^w_t) + log w_t],        ρ_t = log πθ(y_t|s_t) − log π_ref(y_t|s_t),

    and matches it to the data ratio with a Bregman loss `ℓ_h(R) = h′(R)R − h(R) − h′(1/R)` (paper Thm 4.4; docs/algorithms.md
    §3.3): `L = mean_pairs[(1/T) Σ_{t ≤ T} ℓ_h(R_t)]`, with `log R_t` clamped to `±log_ratio_clamp` (to
    `[log_ratio_floor, log_ratio_clamp]` with the optional floor). The state weight `w_t` depends on `args.variant`:

    * `"tbpo_a"`: `log w_t = κ^l_t − κ^w_t`, the forward KL(π_ref ‖ πθ) at each prefix, exact over the vocabulary and
      computed in chunks (the `[tokens, vocab]` logits are never built), with gradient (official code);
    * `"tbpo_q"`: `log w_t = b_φ(s^l_t) − b_φ(s^w_t)`, a learned state baseline (a [`BaselineHead`] on the policy's
      detached final hidden states), centred per pair and clamped to `±baseline_clamp`. As in the official code, the
      head has no regression target for log Z(s): it is trained by the TBPO loss itself, which alone would push
      `log w → −∞` (∂ℓ/∂log R > 0); the centring and the clamp prevent that, so in effect the head learns a zero-mean
      reallocation of weight across the tokens of a pair (docs/algorithms.md §3.4).

    With `args.token_level=False` the trainer optimises sequence-level BPO (one macro-token per response, `w = 1`); with
    `generator="lr"` that is exactly DPO's sigmoid loss.

    The TBPO-Q head (`self.baseline_head`) is not a module of the model: it never enters the reference pass (with PEFT,
    the reference is the model with its adapter disabled; the head is applied only to the policy's hidden states) and
    never enters the saved model. It is trained by its own AdamW optimizer (`self.baseline_optimizer`, constant
    `baseline_learning_rate`), stepped once per optimizer step of the policy (after gradient accumulation), and under
    DDP its gradients are averaged across processes before that step. It is written as `baseline_head.safetensors`
    (and its optimizer as `baseline_optimizer.pt`) in every checkpoint and next to the final model, and both are
    restored by `train(resume_from_checkpoint=...)` (see [`load_baseline_head`] to load it elsewhere).

    Logged metrics (besides DPOTrainer's own, which keep their meaning: `rewards/*` = β Σ_t ρ_t, `logps/*`, `logits/*`,
    `entropy`, `mean_token_accuracy`, `num_tokens`):

    * `log_R/mean`: mean of the clamped `log R_t` over the aligned tokens of every process (sequence level: over
      pairs). Negative means that, state weight included, the policy favours the chosen token over the rejected one
      more than the reference does.
    * `log_R/frac_below_zero`: fraction of aligned tokens with `log R_t < 0`, a token-level preference accuracy.
    * `log_R/frac_at_floor` (with `log_ratio_floor`): fraction of aligned tokens whose `log R_t` sits at the floor,
      i.e. that no longer push the policy.
    * `min_length` (token level): mean number T = min(n_w, n_l) of aligned tokens per pair.
    * `kl/chosen`, `kl/rejected`, `kl/margin` (TBPO-A): the sequential KL `Σ_t κ_t` over the whole chosen and
      rejected completions, and chosen − rejected, as TDPO logs them.
    * `baseline/log_w_abs_mean` (TBPO-Q): mean `|log w_t|` over the aligned tokens, after centring and clamping.
    * `baseline/frac_clamped` (TBPO-Q): fraction of aligned tokens whose centred `log w_t` hit `±baseline_clamp`.
    * `baseline/grad_norm` (TBPO-Q, training): the head's gradient norm before clipping, once per optimizer step.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as in [`~trl.DPOTrainer`] (a path/identifier is loaded with `args.model_init_kwargs`).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Reference model. If `None`: with PEFT, the model with its adapter disabled; otherwise a fresh copy of the
            initial model, loaded from its path.
        args ([`TBPOConfig`], *optional*):
            Configuration. Defaults to `TBPOConfig(f"{model_name}-TBPO")`.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        quantization_config, peft_config:
            As in [`~trl.DPOTrainer`].

    Example:

    ```python
    from datasets import load_dataset
    from trl_tokenpref import TBPOConfig, TBPOTrainer

    dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    trainer = TBPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=TBPOConfig(output_dir="Qwen2.5-0.5B-TBPO"),
                          train_dataset=dataset)
    trainer.train()
    ```
    """

    _config_class = TBPOConfig
    _tag_names = ["trl", "dpo", "tbpo", "trl_tokenpref"]  # DPOTrainer's tags, then ours
    _name = "TBPO"
    # The arXiv title; the method is named TBPO in the paper. Authors as in the recovered LaTeX source (TBPO-tex).
    _paper = {
        "title": "TokenRatio: Principled Token-Level Preference Optimization via Ratio Matching",
        "id": "2605.12288",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{nguyen2026tokenratio,
                title        = {{TokenRatio: Principled Token-Level Preference Optimization via Ratio Matching}},
                author       = {Truong Nguyen and Tien-Phat Nguyen and Linh Ngo Van and Duy Minh Ho Nguyen and Khoa D. Doan and Trung Le},
                year         = 2026,
                booktitle    = {Forty-third International Conference on Machine Learning, {ICML} 2026},
                eprint       = {2605.12288},
                archivePrefix = {arXiv},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.baseline_head = None
        self.baseline_optimizer = None
        if self.args.token_level and self.args.variant == "tbpo_q":
            if self.is_deepspeed_enabled and self.args.fp16:
                raise ValueError(
                    "TBPO-Q does not support DeepSpeed with fp16: DeepSpeed scales the loss by a factor the trainer "
                    "cannot read, so the baseline head's gradients (kept outside DeepSpeed) would be wrongly scaled. "
                    "Use bf16, or `variant='tbpo_a'`."
                )
            self.baseline_head, self.baseline_optimizer = self._create_baseline_head()
            self.add_callback(_BaselineHeadCallback(self))

    # ------------------------------------------------------------------------------------------------------------
    # TBPO-Q state baseline
    # ------------------------------------------------------------------------------------------------------------

    def _create_baseline_head(self) -> tuple[BaselineHead, torch.optim.Optimizer]:
        """The head on the training device, in float32 whatever the model's dtype, and its AdamW optimizer."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        policy = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        # The LM head's input size is the final hidden size (`in_features` survives ZeRO-3 sharding)
        input_size = getattr(policy.get_output_embeddings(), "in_features", None)
        if input_size is None:
            input_size = policy.config.get_text_config().hidden_size
        # Seeded, and without consuming the global RNG: the same seed gives the same head, and the data order and
        # dropout draws of the run are those of TBPO-A
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            head = BaselineHead(input_size, self.args.baseline_hidden_size)
        head = head.to(device=self.accelerator.device, dtype=torch.float32)
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=self.args.baseline_learning_rate, weight_decay=self.args.baseline_weight_decay
        )
        return head, optimizer

    def _state_baselines(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`b_φ(s_t)` at every labelled token, `[N]`, from the policy's final hidden states there, `[N, H]`.

        The hidden state paired with completion token y_t is the one that predicts it, at the position before y_t
        (`TokenBatch.hidden_index`; TRL's shift is logits[:, :-1] ↔ input_ids[:, 1:]): the state of the prefix
        s_t = [x, y_<t], before y_t is chosen, the paper's b_φ(s_t) (as in the official code, where b[:, :-1] is
        aligned with logits[:, :-1]). Only completion positions are scored.
        """
        head_param = next(self.baseline_head.parameters())
        # Detached: the backbone gets no gradient through the head (paper App. C.3; invariant 26). Float32, outside
        # autocast, whatever the model's dtype.
        features = hidden_states.detach().to(device=head_param.device, dtype=head_param.dtype)
        with torch.autocast(head_param.device.type, enabled=False):
            return self.baseline_head(features)

    def _baseline_optimizer_step(self) -> None:
        """One step of the head's optimizer on the gradients accumulated since the last one, then `zero_grad`."""
        params = list(self.baseline_head.parameters())
        # A parameter without gradient gets a zero one, so that every process all-reduces the same tensors
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in params]
        # The head is outside DDP/FSDP/DeepSpeed, so its gradients are per process: average them, as DDP would
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(torch.cat([grad.reshape(-1) for grad in grads]), reduction="mean")
            for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
                grad.copy_(averaged.view_as(grad))
        # Native fp16 AMP scales the loss, hence these gradients, by the GradScaler's current scale: undo it
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
        max_norm = self.args.baseline_max_grad_norm
        if max_norm is None:
            max_norm = self.args.max_grad_norm
        if max_norm is not None and max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad) for grad in grads]))
        # Skip a non-finite step, as the GradScaler skips the policy's
        if torch.isfinite(grad_norm):
            self.baseline_optimizer.step()
        self.baseline_optimizer.zero_grad(set_to_none=True)
        self._metrics["train"]["baseline/grad_norm"].append(grad_norm.item())

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        use_baseline = self.baseline_head is not None
        # The batch's labelled tokens, flat (padded or packed alike): every per-token value below is [N] in its order
        token_batch = TokenBatch.from_inputs(inputs)

        # Per-token statistics. One chunked pass over both LM heads gives log πθ(y_t), log π_ref(y_t) and the forward
        # KL κ_t; TBPO-Q also takes the policy's (detached) final hidden states for its head. The patched
        # `model.forward` does this work (`token_stats.add_token_stats_head`)
        cache_metrics = {}
        if args.token_level or not self.precompute_ref_logps:
            outputs, cache_metrics = self._token_stats_with_reference(
                model, inputs, token_batch, return_hidden_states=use_baseline
            )
            token_logratios = outputs.stats.log_probs - outputs.stats.ref_log_probs  # ρ_t
            logratios = token_batch.sequence_sums(token_logratios)  # S^ρ, DPO's log-ratio of each completion
        else:
            # Sequence-level BPO with `precompute_ref_log_probs`: the reference sums come with the batch
            outputs = self._policy_forward(model, inputs, token_batch=token_batch)
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
            logratios = token_batch.sequence_sums(outputs.stats.log_probs) - ref_logps.to(outputs.stats.log_probs)
        stats = outputs.stats
        chosen_logratios, rejected_logratios = token_batch.split(logratios)

        if args.token_level:
            # Token t of the chosen completion faces token t of the rejected one, for t ≤ T = min(n_w, n_l) (§3.3)
            chosen_rho, rejected_rho, pair_mask = token_batch.aligned_pairs(token_logratios)
            if args.variant == "tbpo_a":
                # Advantage normalisation: log w_t = KL(π_ref‖πθ)(s^l_t) − KL(π_ref‖πθ)(s^w_t), with gradient (§3.4)
                chosen_kl, rejected_kl, _ = token_batch.aligned_pairs(stats.forward_kl)
                log_weights = rejected_kl - chosen_kl
            else:
                # Learned state baseline: log w_t = b_φ(s^l_t) − b_φ(s^w_t), centred per pair, clamped (§3.4)
                baselines = self._state_baselines(outputs.hidden_states).to(token_logratios.device)
                chosen_baselines, rejected_baselines, _ = token_batch.aligned_pairs(baselines)
                log_weights = center_log_weights(
                    rejected_baselines - chosen_baselines, pair_mask, clamp=args.baseline_clamp
                )
        else:
            # Sequence-level BPO: one macro-token per response, log R = β(S^ρ_l − S^ρ_w), w = 1 (§3.7)
            chosen_rho, rejected_rho = chosen_logratios[:, None], rejected_logratios[:, None]
            pair_mask = torch.ones_like(chosen_rho, dtype=torch.bool)
            log_weights = None

        tbpo = tbpo_loss(
            chosen_rho,
            rejected_rho,
            pair_mask,
            beta=self.beta,
            log_weights=log_weights,
            generator=args.generator,
            generator_lambda=args.generator_lambda,
            sba_scale=args.sba_scale,
            log_ratio_clamp=args.log_ratio_clamp,
            label_smoothing=args.label_smoothing,
            log_ratio_floor=args.log_ratio_floor,
        )
        loss = self._add_aux_loss(tbpo.losses.mean(), outputs, mode)

        self._log_dpo_metrics(mode, token_batch, outputs, chosen_logratios, rejected_logratios)
        metrics = tbpo.metrics | cache_metrics  # log_R/* (and kl/cache_tail_mass)
        if args.token_level:
            metrics["min_length"] = Metric(pair_mask.sum(dim=1))  # aligned tokens per pair, T = min(n_w, n_l)
        if args.token_level and args.variant == "tbpo_a":
            # Sequential KL of each completion, as TDPO logs it
            metrics.update(sequential_kl_metrics(*token_batch.split(token_batch.sequence_sums(stats.forward_kl))))
        if use_baseline:
            metrics["baseline/log_w_abs_mean"] = Metric(log_weights.abs(), pair_mask)
            metrics["baseline/frac_clamped"] = Metric((log_weights.abs() >= args.baseline_clamp).float(), pair_mask)
        self._log_metrics(mode, metrics)
        return self._maybe_return_outputs(model, inputs, loss, return_outputs)

    # ------------------------------------------------------------------------------------------------------------
    # Saving and resuming the TBPO-Q head (a separate file; never part of the model's weights)
    # ------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Written first, so that a `push_to_hub` at the end of `save_model` uploads it too. Every checkpoint goes
        # through here (`_save_checkpoint` calls `save_model`).
        if self.baseline_head is not None and self.args.should_save:
            save_baseline_head(self.baseline_head, output_dir if output_dir is not None else self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.baseline_optimizer is not None and self.args.should_save:
            torch.save(self.baseline_optimizer.state_dict(), os.path.join(output_dir, BASELINE_OPTIMIZER_NAME))

    def _load_baseline_head(self, checkpoint: str | None) -> None:
        if self.baseline_head is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, BASELINE_HEAD_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"No TBPO-Q baseline head ({BASELINE_HEAD_NAME}) in {checkpoint}, e.g. a checkpoint of another "
                "trainer or variant: the head starts from its initialisation (log w = 0)."
            )
            return
        loaded = load_baseline_head(path)
        expected = (self.baseline_head.input_size, self.baseline_head.hidden_size)
        if (loaded.input_size, loaded.hidden_size) != expected:
            raise ValueError(
                f"The baseline head in {checkpoint} has input size {loaded.input_size} and hidden size "
                f"{loaded.hidden_size}, but this trainer's head has {expected[0]} and {expected[1]}. Set "
                f"`baseline_hidden_size={loaded.hidden_size}` to resume from this checkpoint."
            )
        self.baseline_head.load_state_dict(loaded.state_dict())  # copied in place: the optimizer keeps its params

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_baseline_head(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.is_deepspeed_enabled:
            # `train` does not call `_load_from_checkpoint` under DeepSpeed (the engine loads the model's own
            # checkpoint), so the head is restored here, on that path only (tests/test_deepspeed.py)
            self._load_baseline_head(checkpoint)
        if self.baseline_optimizer is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, BASELINE_OPTIMIZER_NAME)
        if not os.path.isfile(path):
            logger.warning(f"No TBPO-Q baseline optimizer state ({BASELINE_OPTIMIZER_NAME}) in {checkpoint}.")
            return
        # Read on the CPU: `load_state_dict` moves each state to its parameter's device. (DeepSpeed's CPU accelerator
        # names the device `cpu:0`, a location `torch.load` cannot restore to.)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        self.baseline_optimizer.load_state_dict(state_dict)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_baseline_head(self.state.best_model_checkpoint)
