"""`modeling_mmllm.saving`, as the README shows it: atomic saving lives in `export.saving`."""

from ..export.saving import *  # noqa: F403
from ..export.saving import __all__  # noqa: F401
