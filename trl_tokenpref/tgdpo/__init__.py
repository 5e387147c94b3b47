from .tgdpo_config import TGDPOConfig
from .tgdpo_trainer import DataCollatorForTGDPO, TGDPOTrainer


__all__ = ["DataCollatorForTGDPO", "TGDPOConfig", "TGDPOTrainer"]
