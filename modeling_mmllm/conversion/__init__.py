"""`modeling_mmllm.conversion`, as the README shows it: the converters live in `builders.conversion`."""

from ..builders.conversion import *  # noqa: F403
from ..builders.conversion import __all__  # noqa: F401
