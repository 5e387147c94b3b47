"""The package's logger: accelerate's multi-process logger, with the `[RANK i]` prefix only where several processes run.

accelerate's `get_logger` logs on the main process only (unless `main_process_only=False`) and prefixes every message
with `[RANK <index>]`, also in a single-process run, where the prefix says nothing. Ours keeps accelerate's behaviour
when the launcher started several processes (`WORLD_SIZE > 1`: `accelerate launch`, `torchrun`) and otherwise logs the
message as it is, without needing accelerate's state (which accelerate's logger refuses to log without).
"""

import os

from accelerate.logging import MultiProcessAdapter
from accelerate.logging import get_logger as _accelerate_get_logger
from accelerate.state import PartialState


def several_processes() -> bool:
    """Whether the launcher started several processes (`accelerate launch`, `torchrun` and the like set
    `WORLD_SIZE`)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class PackageLogger(MultiProcessAdapter):
    """accelerate's [`~accelerate.logging.MultiProcessAdapter`] with the `[RANK i]` prefix only under several
    processes. `main_process_only`, `in_order` and `warning_once` work as in accelerate."""

    def process(self, msg, kwargs):
        if several_processes():
            return super().process(msg, kwargs)
        # As accelerate's adapter: the record names our caller, not this module
        kwargs.setdefault("stacklevel", 2)
        return msg, kwargs

    def log(self, level, msg, *args, **kwargs):
        if several_processes():
            PartialState()  # the state accelerate's adapter reads (a run's `TrainingArguments` has created it already)
            return super().log(level, msg, *args, **kwargs)
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> PackageLogger:
    """The logger of module `name`, with accelerate's level handling (`ACCELERATE_LOG_LEVEL`)."""
    return PackageLogger(_accelerate_get_logger(name).logger, {})
