"""Token-level preference optimisation (TDPO, TGDPO, TBPO) as drop-in subclasses of TRL's `DPOTrainer`.

The classes are imported on first use, as `trl` imports its own: `import trl_tokenpref` alone loads neither TRL's
trainers nor peft (nor bitsandbytes, which peft imports where it is installed, and which may print notices at import),
so it prints nothing that `import trl` does not.
"""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Each public name and the submodule that defines it
_LAZY_ATTRIBUTES = {
    "TBPOConfig": ".tbpo",
    "TBPOTrainer": ".tbpo",
    "TDPOConfig": ".tdpo",
    "TDPOTrainer": ".tdpo",
    "TGDPOConfig": ".tgdpo",
    "TGDPOTrainer": ".tgdpo",
}

__all__ = ["TBPOConfig", "TBPOTrainer", "TDPOConfig", "TDPOTrainer", "TGDPOConfig", "TGDPOTrainer"]

if TYPE_CHECKING:
    from .tbpo import TBPOConfig, TBPOTrainer
    from .tdpo import TDPOConfig, TDPOTrainer
    from .tgdpo import TGDPOConfig, TGDPOTrainer


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
