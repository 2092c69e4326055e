"""Every tutorial notebook runs top to bottom against the installed library."""
from pathlib import Path

import pytest
from execnb.nbio import read_nb
from execnb.shell import CaptureShell

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("*.ipynb"))


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/ has no notebooks"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_tutorial_runs(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    shell = CaptureShell()
    shell.run_all(read_nb(path), exc_stop=True)
