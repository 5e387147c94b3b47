from dataclasses import dataclass, field

from ..base import TokenLevelDPOConfig, check_finite_number
from ..losses import TDPO_VARIANTS


@dataclass
class TDPOConfig(TokenLevelDPOConfig):
    r"""
    Configuration class for the [`TDPOTrainer`].

    It accepts every [`~trl.DPOConfig`] parameter and adds the two of Token-level Direct Preference Optimization
    ([TDPO](https://huggingface.co/papers/2404.11999)). Defaults follow the paper (α = 0.5, TDPO2, β = 0.1).

    Parameters:
        > Parameters that control the TDPO loss

        variant (`str`, *optional*, defaults to `"tdpo2"`):
            Which TDPO loss to use. Possible values are:

                - `"tdpo2"`: `-log σ(β[(Σρ_w − Σρ_l) − α(Σκ_l − sg(Σκ_w))])` (paper Eq. 18), the variant the paper
                  recommends and uses "for the remainder of the paper". The chosen sequential KL is a stop-gradient
                  baseline.
                - `"tdpo1"`: `-log σ(β[(Σρ_w − Σρ_l) − (Σκ_l − Σκ_w)])` (paper Eq. 15). `alpha` is ignored. The official
                  code's README recommends it at low learning rates.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight α ≥ 0 of the sequential-KL margin in TDPO2. With `alpha=0`, TDPO2 is exactly DPO's sigmoid loss.
        token_chunk_size (`int` or `None`, *optional*):
            Number of completion tokens projected through the LM head at once (see [`TokenLevelDPOConfig`]).

    > [!NOTE]
    > Every other default is [`~trl.DPOConfig`]'s (e.g. `learning_rate=1e-6`, `beta=0.1`). The paper trains with
    > RMSprop at `learning_rate=5e-6` and 150 warm-up steps; see `recipes/` for its settings.
    > With `precompute_ref_log_probs=True` the reference's top-`ref_top_k` distribution is stored per completion token
    > (the reference cache, docs/algorithms.md §9): no reference model is kept in memory and a step runs the policy only.
    """

    variant: str = field(
        default="tdpo2",
        metadata={
            "help": "Which TDPO loss: 'tdpo2' (KL margin weighted by alpha, stop-gradient on the chosen KL; the "
            "paper's recommendation) or 'tdpo1' (unweighted KL margin).",
            "choices": list(TDPO_VARIANTS),
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the sequential-KL margin in TDPO2 (>= 0). alpha=0 gives DPO. Ignored by tdpo1."},
    )

    _needs_reference_distribution = True
    _method_name = "TDPO"

    def __post_init__(self):
        if self.variant not in TDPO_VARIANTS:
            raise ValueError(f"`variant` must be one of {list(TDPO_VARIANTS)}, got {self.variant!r}.")
        check_finite_number(
            "alpha",
            self.alpha,
            minimum=0.0,
            hint="It weights the sequential-KL margin of TDPO2 (the paper uses 0.5; 0 recovers DPO).",
        )
        super().__post_init__()
