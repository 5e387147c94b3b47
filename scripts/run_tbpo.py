# /// script
# dependencies = [
#     "trl-tokenpref",
#     "trl>=1.16,<1.17",
#     "peft",
#     "trackio",
# ]
# ///

"""
Train with TBPO (Token-level Bregman Preference Optimization, "TokenRatio", https://huggingface.co/papers/2605.12288).

The same arguments as TRL's `trl/scripts/dpo.py` (every `TBPOConfig`/`DPOConfig`, `ModelConfig`, `ScriptArguments` and
`DatasetMixtureConfig` field, on the command line or in a `--config recipe.yaml`), plus TBPO's `--variant`
(tbpo_a | tbpo_q), `--generator` (lr | kliep | lsif | ba | sba), `--generator_lambda`, `--sba_scale`,
`--log_ratio_clamp`, `--token_level` and the TBPO-Q head's `--baseline_*`. Recipes with memory-safe settings are in
`recipes/tbpo/`, documented in `recipes/README.md`.

# Full training (TBPO-A, SBA generator: the paper's defaults)
```bash
python scripts/run_tbpo.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dtype bfloat16 \
    --variant tbpo_a \
    --learning_rate 5.0e-7 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --eval_strategy steps \
    --eval_steps 50 \
    --output_dir Qwen2.5-0.5B-TBPO
```

# LoRA (TBPO-Q: the learned state baseline is saved as baseline_head.safetensors next to the adapter)
```bash
python scripts/run_tbpo.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dtype bfloat16 \
    --variant tbpo_q \
    --learning_rate 5.0e-6 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --output_dir Qwen2.5-0.5B-TBPO-LoRA \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 64
```

# QLoRA (needs `pip install bitsandbytes`)
```bash
python scripts/run_tbpo.py --config recipes/tbpo/qlora_7b.yaml
# which is: ... --use_peft --load_in_4bit --bnb_4bit_quant_type nf4 --use_bnb_nested_quant --dtype bfloat16
```

# Several GPUs (a TRL-shipped accelerate config: multi_gpu, zero1/2/3, fsdp1/2)
```bash
accelerate launch \
    --config_file $(python -c "import trl, os; print(os.path.join(os.path.dirname(trl.__file__), 'accelerate_configs', 'zero3.yaml'))") \
    scripts/run_tbpo.py --config recipes/tbpo/full_zero3.yaml
```

# On CPU, offline, against the embedded tiny model and dataset
```bash
python -m trl_tokenpref.tiny outputs/tiny-model && python -m trl_tokenpref.data outputs/tiny-data
python scripts/run_tbpo.py --config recipes/tbpo/tiny.yaml
```

Resume an interrupted run with `--resume_from_checkpoint last` (the newest `checkpoint-*` in `output_dir` that is
complete and what was saved, each file checked against the checkpoint's manifest and the weights finite; a newer
one is skipped with a warning saying what is wrong with it; TBPO-Q's head and its optimizer are restored too) or
`--resume_from_checkpoint PATH`. `--dataset_name` also takes a local `.json`/`.jsonl`/`.parquet` file or a directory
of such files (e.g. `train.jsonl` + `test.jsonl`). Local paths are checked before anything is loaded, and a recipe key
that no argument has is named in a warning.

A run holds its `output_dir`: a second run into it (a job submitted twice) stops at once, naming the first (host,
process, start time). A non-finite loss, or an update that made weights non-finite, stops the run at
its step, naming the last checkpoint, before anything non-finite is logged or saved (docs/architecture.md, "What a run leaves on disk").
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from trl import get_peft_config, get_quantization_config

    from trl_tokenpref import TBPOTrainer
    from trl_tokenpref.cli import (
        check_before_loading,
        load_preference_dataset,
        select_splits,
        set_model_init_kwargs,
        train_and_save,
    )

    # Before anything is loaded: the local paths exist, the checkpoint to resume from is complete, and a run that
    # does not resume is warned when `output_dir` holds an earlier run's checkpoints
    check_before_loading(script_args, training_args, model_args, dataset_args)
    set_model_init_kwargs(training_args, model_args)
    dataset = load_preference_dataset(script_args, dataset_args)
    # The train split, and the test split when the run evaluates (a missing one is named, with the splits there are)
    train_dataset, eval_dataset = select_splits(dataset, script_args, training_args)

    # Initialize the TBPO trainer (the model is loaded from its path with `training_args.model_init_kwargs`)
    trainer = TBPOTrainer(
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

    from trl_tokenpref import TBPOConfig

    dataclass_types = (ScriptArguments, TBPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("tbpo", help="Run the TBPO training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    from trl_tokenpref.cli import parse_args_and_config

    # TrlParser's `parse_args_and_config(fail_with_unknown_args=False)`, naming the config keys it ignores
    script_args, training_args, model_args, dataset_args = parse_args_and_config(make_parser())
    main(script_args, training_args, model_args, dataset_args)
