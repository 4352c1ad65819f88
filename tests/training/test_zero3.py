"""DeepSpeed ZeRO-3: modality-adaptive copies are gathered, a step trains, the runner saves full weights."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Checked without importing deepspeed into the test process (it sets up its accelerator on import).
if importlib.util.find_spec("deepspeed") is None:
    pytest.fail("deepspeed is a test dependency: pip install -e '.[test]'", pytrace=False)


@pytest.mark.slow
def test_enable_modality_adaptive_under_zero3(tmp_path):
    script = Path(__file__).with_name("zero3_modality_adaptive.py")
    run = subprocess.run(
        [sys.executable, str(script), "29561", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["partitioned_before"]  # the text branch really was partitioned
    assert report["copies_equal"] and report["copies_nonempty"] and report["branches"] == 8
    assert report["trained_step_loss"] > 0
    # The runner under ZeRO-3 saves gathered weights: the projector and the image branches are not empty.
    assert report["saved_projector_numel"] > 0 and report["saved_branch_numel"] > 0
