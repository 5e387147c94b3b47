import textwrap

from ..base import TokenLevelDPOTrainer
from ..losses import tdpo_loss
from ..token_batch import TokenBatch
from .tdpo_config import TDPOConfig


class TDPOTrainer(TokenLevelDPOTrainer):
    """
    Trainer for Token-level Direct Preference Optimization (TDPO), Zeng et al., ICML 2024
    ([paper](https://huggingface.co/papers/2404.11999)).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, same dataset formats, same metrics, plus the
    sequential KL `kl/chosen`, `kl/rejected`, `kl/margin`. The loss adds to DPO's margin the difference of the
    summed per-token forward KL(π_ref ‖ πθ) of the two completions, computed exactly over the vocabulary, in chunks:
    the `[tokens, vocab]` logits of neither model are materialised.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as in [`~trl.DPOTrainer`] (a path/identifier is loaded with `args.model_init_kwargs`).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Reference model. If `None`: with PEFT, the model with its adapter disabled; otherwise a fresh copy of the
            initial model, loaded from its path.
        args ([`TDPOConfig`], *optional*):
            Configuration. Defaults to `TDPOConfig(f"{model_name}-TDPO")`.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        quantization_config, peft_config:
            As in [`~trl.DPOTrainer`].

    Example:

    ```python
    from datasets import load_dataset
    from trl_tokenpref import TDPOConfig, TDPOTrainer

    dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    trainer = TDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=TDPOConfig(output_dir="Qwen2.5-0.5B-TDPO"),
                          train_dataset=dataset)
    trainer.train()
    ```
    """

    _config_class = TDPOConfig
    _tag_names = ["trl", "dpo", "tdpo", "trl_tokenpref"]  # DPOTrainer's tags, then ours
    _name = "TDPO"
    _paper = {
        "title": "Token-level Direct Preference Optimization",
        "id": "2404.11999",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zeng2024token,
                title        = {{Token-level Direct Preference Optimization}},
                author       = {Yongcheng Zeng and Guoqing Liu and Weiyu Ma and Ning Yang and Haifeng Zhang and Jun Wang},
                year         = 2024,
                booktitle    = {Forty-first International Conference on Machine Learning, {ICML} 2024},
            }"""),
    }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # The batch's labelled tokens, flat (padded or packed alike): every per-token value below is [N] in its order
        token_batch = TokenBatch.from_inputs(inputs)

        # Per completion token: log πθ(y_t), log π_ref(y_t) and κ_t = KL(π_ref(·|s_t) ‖ πθ(·|s_t)) (paper Def. 4.3),
        # from one chunked pass over both LM heads, or over the policy's alone with the reference cache
        # (`precompute_ref_log_probs=True`: κ is the cached KL_K). The patched `model.forward` does this work
        # (`token_stats.add_token_stats_head`).
        outputs, cache_metrics = self._token_stats_with_reference(model, inputs, token_batch)
        stats = outputs.stats

        # Sums over each completion: S^ρ (the DPO log-ratio) and S^κ = D_SeqKL (Eqs. 13-14)
        chosen_logratios, rejected_logratios = token_batch.split(
            token_batch.sequence_sums(stats.log_probs - stats.ref_log_probs)
        )
        chosen_kl, rejected_kl = token_batch.split(token_batch.sequence_sums(stats.forward_kl))

        tdpo = tdpo_loss(
            chosen_logratios,
            rejected_logratios,
            chosen_kl,
            rejected_kl,
            beta=self.beta,
            alpha=self.args.alpha,
            variant=self.args.variant,
        )
        loss = self._add_aux_loss(tdpo.losses.mean(), outputs, mode)

        self._log_dpo_metrics(mode, token_batch, outputs, chosen_logratios, rejected_logratios)
        self._log_metrics(mode, tdpo.metrics | cache_metrics)  # kl/* and the paper's reward, tdpo_rewards/*
        return self._maybe_return_outputs(model, inputs, loss, return_outputs)
