import math
from dataclasses import dataclass, field
from typing import Any

from ..base import TokenLevelDPOConfig, check_finite_number


@dataclass
class TGDPOConfig(TokenLevelDPOConfig):
    r"""
    Configuration class for the [`TGDPOTrainer`].

    It accepts every [`~trl.DPOConfig`] parameter and adds those of Token-level reward Guided Direct Preference
    Optimization ([TGDPO](https://huggingface.co/papers/2506.14574)). Defaults follow the official code (α = 0.5,
    β = 0.1, no clamp of the token weights).

    Parameters:
        > Parameters that control the TGDPO loss

        alpha (`float`, *optional*, defaults to `0.5`):
            Guidance strength α ≥ 0. Each chosen token's log-ratio is weighted by `1 + α·r̂_t` and each rejected
            token's by `1 − α·r̂_t`, where `r̂_t = β·(log π_guide(y_t|s_t) − log π_ref(y_t|s_t))` is the token reward
            of the guidance model. With `alpha=0` the loss is exactly DPO's sigmoid loss.
        min_token_weight (`float` or `None`, *optional*, defaults to `None`):
            Lower bound of the token weights `1 ± α·r̂_t`. A weight becomes negative, reversing that token's update,
            when `|r̂_t| > 1/α` (20 nats of guidance/reference log-ratio at the defaults); `min_token_weight=0.0`
            prevents it. `None` (the default) leaves the weights unbounded below, as the official code does.
        max_token_weight (`float` or `None`, *optional*, defaults to `None`):
            Upper bound of the token weights. `None` (the default) leaves them unbounded above, as the official code
            does.

        > Parameters that control the guidance model

        guidance_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Path or Hub identifier of the guidance model π_guide, a causal LM with the policy's tokenizer (usually a
            DPO model trained from the same reference). Give the guidance model here or as the trainer's
            `guidance_model`, or not at all when the datasets carry precomputed `chosen_token_rewards` /
            `rejected_token_rewards` columns (see `scripts/compute_token_rewards.py`); giving both is an error.
            `"none"` or `"null"` (e.g. `--guidance_model_name_or_path none`, to override a recipe) means `None`.
        guidance_model_init_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the guidance model is loaded from a
            path. Defaults to `model_init_kwargs` without its `revision`; `dtype` defaults to the policy's dtype, as
            for the reference model.
        token_chunk_size (`int` or `None`, *optional*):
            Number of completion tokens projected at once (see [`TokenLevelDPOConfig`]).

    > [!NOTE]
    > Every other default is [`~trl.DPOConfig`]'s (e.g. `learning_rate=1e-6`, `beta=0.1`). The official recipe uses
    > `learning_rate=7e-7`, a cosine schedule with `warmup_ratio=0.1` and one epoch.
    >
    > `beta` enters twice: in the token reward r̂ = β·Δ and in the loss. Precomputed `*_token_rewards` columns hold
    > r̂ at the β given to `scripts/compute_token_rewards.py`; training with another β is equivalent to scaling
    > `alpha` by β_script / β.
    >
    > Unlike TDPO, `precompute_ref_log_probs=True` is supported: the reference's per-token log-probabilities (and,
    > with a guidance model, the token rewards) are computed once before training and stored as per-token columns.
    """

    _VALID_DICT_FIELDS = TokenLevelDPOConfig._VALID_DICT_FIELDS + ["guidance_model_init_kwargs"]

    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Guidance strength (>= 0): chosen tokens are weighted by 1 + alpha*r_t, rejected tokens by "
            "1 - alpha*r_t. alpha=0 gives DPO."
        },
    )
    min_token_weight: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound of the token weights 1 +/- alpha*r_t (e.g. 0.0 to forbid sign flips). None leaves "
            "them unbounded, as the official code does."
        },
    )
    max_token_weight: float | None = field(
        default=None,
        metadata={"help": "Upper bound of the token weights. None leaves them unbounded, as the official code does."},
    )
    guidance_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub id of the guidance model (a causal LM with the policy's tokenizer, usually a DPO "
            "model trained from the same reference). Not needed when the dataset has precomputed "
            "chosen_token_rewards/rejected_token_rewards columns."
        },
    )
    guidance_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for from_pretrained when loading the guidance model from a path. Defaults to "
            "model_init_kwargs, with the policy's dtype."
        },
    )

    _needs_reference_distribution = False  # r̂ and ρ only need the reference's log-prob of each label
    _method_name = "TGDPO"

    def __post_init__(self):
        # Our checks first (as the base class does), so that a wrong TGDPO value is the error the user sees.
        # `--guidance_model_name_or_path none` (command line) or `null` (a recipe) clears a path set by a recipe, e.g.
        # to train on a dataset with precomputed token rewards
        path = self.guidance_model_name_or_path
        if isinstance(path, str) and path.strip().lower() in ("", "none", "null"):
            self.guidance_model_name_or_path = None
        check_finite_number(
            "alpha",
            self.alpha,
            minimum=0.0,
            hint="It is the guidance strength of the token weights 1 ± alpha·r̂ (the paper uses 0.5; 0 recovers DPO).",
        )
        for name in ("min_token_weight", "max_token_weight"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number or None, got {value}.")
        if (
            self.min_token_weight is not None
            and self.max_token_weight is not None
            and self.min_token_weight > self.max_token_weight
        ):
            raise ValueError(
                f"`min_token_weight` ({self.min_token_weight}) must not exceed `max_token_weight` "
                f"({self.max_token_weight}): they bound the token weights 1 ± alpha·r̂ from below and above."
            )
        super().__post_init__()
        # After TrainingArguments' own checks, which parse a JSON string from the command line into a dict
        if self.guidance_model_init_kwargs is not None and not isinstance(self.guidance_model_init_kwargs, dict):
            raise TypeError(
                "`guidance_model_init_kwargs` must be a dict (or, from the command line, a JSON object string), got "
                f"{type(self.guidance_model_init_kwargs).__name__}."
            )

    @property
    def token_weight_clamp(self) -> tuple[float, float] | None:
        """The `(lo, hi)` bounds of the token weights, or None when neither bound is set."""
        if self.min_token_weight is None and self.max_token_weight is None:
            return None
        lo = -math.inf if self.min_token_weight is None else float(self.min_token_weight)
        hi = math.inf if self.max_token_weight is None else float(self.max_token_weight)
        return lo, hi
