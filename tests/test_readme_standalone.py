"""The README's commands that read nothing of the quickstart's folder (benchmarks, builds, conversions, training on
tiny presets), run as test_readme.py runs every README command, in a folder of their own with the same stand-ins: in
a file of their own, so pytest-xdist runs them on another worker while test_readme.py waits for the quickstart."""

import pytest
from test_readme import COMMANDS, run_readme_command, save_stand_ins, uses_the_quickstart


@pytest.fixture(scope="module")
def standalone_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-standalone")
    save_stand_ins(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [command for command, how in COMMANDS.items() if how and not uses_the_quickstart(command)]
)
def test_readme_command_runs_on_its_own(command, standalone_workdir, monkeypatch, capsys):
    run_readme_command(command, standalone_workdir, monkeypatch, capsys)
