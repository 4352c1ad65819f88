"""The `mmllm` command line (`mmllm ...`, `python -m modeling_mmllm.cli ...`)."""

from .main import main, parser

__all__ = ["main", "parser"]
