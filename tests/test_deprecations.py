"""The early-warning net: deprecations reached from the hub set's own code fail hub-set tests."""

import logging
import warnings

import pytest

from helpers import HUB_FILES
from modeling_mmllm.export.hub_card import hub_set_files

pytestmark = pytest.mark.hub


def _run_as_hub_code(source: str) -> None:
    """Execute `source` as if it were a line of the hub set's modeling file."""
    path = next(path for path in hub_set_files() if path.endswith("modeling_mmllm.py"))
    exec(compile(source, str(path), "exec"), {"warnings": warnings, "logging": logging})


def test_a_future_warning_from_the_hub_set_is_an_error():
    assert "modeling_mmllm.py" in HUB_FILES and "modality_adaptive.py" in HUB_FILES
    with pytest.raises(FutureWarning, match="renamed"):
        _run_as_hub_code("warnings.warn('`x` is renamed', FutureWarning)")
    with pytest.raises(DeprecationWarning):
        _run_as_hub_code("warnings.warn('old', DeprecationWarning)")


def test_a_deprecation_transformers_logs_for_the_hub_set_is_an_error():
    with pytest.raises(FutureWarning, match="deprecated"):
        _run_as_hub_code("logging.getLogger('transformers.utils.generic').warning('`past_key_values` is deprecated')")


def test_other_code_only_warns():
    with pytest.warns(FutureWarning):
        warnings.warn("not from the hub set", FutureWarning, stacklevel=1)
