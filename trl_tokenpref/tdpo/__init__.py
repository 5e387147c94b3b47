from .tdpo_config import TDPOConfig
from .tdpo_trainer import TDPOTrainer


__all__ = ["TDPOConfig", "TDPOTrainer"]
