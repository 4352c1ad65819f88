"""The library's logger: accelerate's multi-process logger, so a message is written once, by the main process.

Messages go through the `modeling_mmllm` logger, which writes INFO and above to stderr (as transformers' own
logger does for `transformers`); they also propagate, so an application's logging set-up and pytest's `caplog`
see them.
"""

import logging
import sys

from accelerate import PartialState
from accelerate.logging import MultiProcessAdapter

ROOT = "modeling_mmllm"


class MainProcessLogger(MultiProcessAdapter):
    """accelerate's adapter (`main_process_only=True` by default), usable before a Trainer sets up the processes."""

    def log(self, level, msg, *args, **kwargs):
        PartialState()  # the launcher's process group, as the Trainer will use it
        super().log(level, msg, *args, **kwargs)


def get_logger(name: str) -> MainProcessLogger:
    """The logger of module `name` (`get_logger(__name__)`)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return MainProcessLogger(logging.getLogger(name), {})


__all__ = ["MainProcessLogger", "get_logger"]
