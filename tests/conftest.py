"""Shared pytest fixtures: run the `illume-ref` CLI in-process or as a real subprocess."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli():
    "Call `illume-ref ARGS...` in-process; returns (exit code, stdout, stderr)."
    from illume_ref.cli import main

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def console():
    "Run the installed `illume-ref` console script in a subprocess; returns CompletedProcess."
    exe = Path(sys.executable).parent / "illume-ref"

    def run(*argv, timeout=600, cwd=None):
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "illume_ref.cli"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)

    return run
