"""Token-level preference optimisation (TDPO, TGDPO, TBPO) as drop-in subclasses of TRL's `DPOTrainer`."""

from .tbpo import TBPOConfig, TBPOTrainer
from .tdpo import TDPOConfig, TDPOTrainer
from .tgdpo import TGDPOConfig, TGDPOTrainer


__version__ = "0.1.0"

__all__ = ["TBPOConfig", "TBPOTrainer", "TDPOConfig", "TDPOTrainer", "TGDPOConfig", "TGDPOTrainer"]
