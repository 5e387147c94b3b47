# /// script
# dependencies = [
#     "trl-tokenpref",
#     "trl>=1.16,<1.17",
#     "peft",
#     "trackio",
# ]
# ///

"""
Train with TGDPO (Token-level reward Guided Direct Preference Optimization, https://huggingface.co/papers/2506.14574).

The same arguments as TRL's `trl/scripts/dpo.py` (every `TGDPOConfig`/`DPOConfig`, `ModelConfig`, `ScriptArguments` and
`DatasetMixtureConfig` field, on the command line or in a `--config recipe.yaml`), plus TGDPO's `--alpha`,
`--guidance_model_name_or_path`, `--guidance_model_init_kwargs` and `--min_token_weight`/`--max_token_weight`. The token
rewards come from the guidance model (a DPO model trained from the same reference, with the same tokenizer), or from
`chosen_token_rewards`/`rejected_token_rewards` columns precomputed by `scripts/compute_token_rewards.py`. Recipes with
memory-safe settings are in `recipes/tgdpo/`, documented in `recipes/README.md`.

# Full training (guidance: a public DPO model trained from Llama-3-8B-Instruct)
```bash
python scripts/run_tgdpo.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \
    --guidance_model_name_or_path princeton-nlp/Llama-3-Instruct-8B-DPO \
    --dtype bfloat16 \
    --alpha 0.5 \
    --learning_rate 7.0e-7 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --output_dir Llama-3-8B-Instruct-TGDPO
```

# LoRA
```bash
python scripts/run_tgdpo.py --config recipes/tgdpo/lora_8b.yaml
# which is: ... --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear --dtype bfloat16
```

# QLoRA (needs `pip install bitsandbytes`; the guidance model is loaded in 4 bits too)
```bash
python scripts/run_tgdpo.py --config recipes/tgdpo/qlora_8b.yaml
```

# Precomputed token rewards (no guidance model in memory during training)
```bash
python scripts/compute_token_rewards.py --guidance_model princeton-nlp/Llama-3-Instruct-8B-DPO \
    --ref_model meta-llama/Meta-Llama-3-8B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
    --output_dir data/uf-token-rewards --beta 0.1 --max_length 1024 --dtype bfloat16
python scripts/run_tgdpo.py \
    --dataset_name data/uf-token-rewards \
    --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \
    --dtype bfloat16 \
    --max_length 1024 \
    --precompute_ref_log_probs \
    --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \
    --learning_rate 5.0e-6 \
    --output_dir Llama-3-8B-Instruct-TGDPO-LoRA
```

# Several GPUs (a TRL-shipped accelerate config: multi_gpu, zero1/2/3, fsdp1/2)
```bash
accelerate launch \
    --config_file $(python -c "import trl, os; print(os.path.join(os.path.dirname(trl.__file__), 'accelerate_configs', 'zero3.yaml'))") \
    scripts/run_tgdpo.py --config recipes/tgdpo/full_zero3.yaml
```

# On CPU, offline, against the embedded tiny model and dataset (guidance: a tiny DPO model, i.e. TDPO2 with alpha=0)
```bash
python -m trl_tokenpref.tiny outputs/tiny-model && python -m trl_tokenpref.data outputs/tiny-data
python scripts/run_tdpo.py --config recipes/tdpo/tiny.yaml --alpha 0 --max_steps 20 --output_dir outputs/tiny-guidance
python scripts/run_tgdpo.py --config recipes/tgdpo/tiny.yaml
```

Resume an interrupted run with `--resume_from_checkpoint last` (the newest `checkpoint-*` in `output_dir` that is
complete and what was saved, each file checked against the checkpoint's manifest and the weights finite; a newer
one is skipped with a warning saying what is wrong with it) or `--resume_from_checkpoint PATH`. `--dataset_name` also
takes a local `.json`/`.jsonl`/`.parquet` file, a directory of such files (e.g. `train.jsonl` + `test.jsonl`), or a
`save_to_disk` directory (what `compute_token_rewards.py` writes). Local paths are checked before anything is loaded,
and a recipe key that no argument has is named in a warning.

A run holds its `output_dir`: a second run into it (a job submitted twice) stops at once, naming the first (host,
process, start time). A non-finite loss, or an update that made weights non-finite, stops the run at
its step, naming the last checkpoint, before anything non-finite is logged or saved (docs/architecture.md, "What a run leaves on disk").
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from trl import get_peft_config, get_quantization_config

    from trl_tokenpref import TGDPOTrainer
    from trl_tokenpref.cli import (
        check_before_loading,
        load_preference_dataset,
        select_splits,
        set_model_init_kwargs,
        train_and_save,
    )
    from trl_tokenpref.tgdpo.token_rewards import check_token_rewards_beta

    # Before anything is loaded: the local paths exist, the checkpoint to resume from is complete, and a run that
    # does not resume is warned when `output_dir` holds an earlier run's checkpoints
    check_before_loading(script_args, training_args, model_args, dataset_args)
    if script_args.dataset_name and not dataset_args.datasets:
        # Token rewards from `compute_token_rewards.py` hold r̂ at its β: its info file beside the data says which (and
        # the data must be what it describes); the trainer also reads β from the rows (`token_rewards_beta`)
        check_token_rewards_beta(script_args.dataset_name, training_args.beta, "train")
    set_model_init_kwargs(training_args, model_args)
    dataset = load_preference_dataset(script_args, dataset_args)
    # The train split, and the test split when the run evaluates (a missing one is named, with the splits there are)
    train_dataset, eval_dataset = select_splits(dataset, script_args, training_args)

    # Initialize the TGDPO trainer (the model is loaded from its path with `training_args.model_init_kwargs`, the
    # guidance model from `training_args.guidance_model_name_or_path` unless the dataset holds precomputed rewards)
    trainer = TGDPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    # Train (resuming if asked), save, and push to the Hub if `push_to_hub` is set
    train_and_save(trainer, script_args, training_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenpref import TGDPOConfig

    dataclass_types = (ScriptArguments, TGDPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("tgdpo", help="Run the TGDPO training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    from trl_tokenpref.cli import parse_args_and_config

    # TrlParser's `parse_args_and_config(fail_with_unknown_args=False)`, naming the config keys it ignores
    script_args, training_args, model_args, dataset_args = parse_args_and_config(make_parser())
    main(script_args, training_args, model_args, dataset_args)
