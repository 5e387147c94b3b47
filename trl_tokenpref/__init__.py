"""Token-level preference optimisation (TDPO, TGDPO, TBPO) as drop-in subclasses of TRL's `DPOTrainer`."""

from .tdpo import TDPOConfig, TDPOTrainer


__version__ = "0.1.0"

__all__ = ["TDPOConfig", "TDPOTrainer"]
