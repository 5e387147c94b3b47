from .baseline_head import BaselineHead, load_baseline_head, save_baseline_head
from .tbpo_config import TBPOConfig
from .tbpo_trainer import TBPOTrainer


__all__ = ["BaselineHead", "TBPOConfig", "TBPOTrainer", "load_baseline_head", "save_baseline_head"]
