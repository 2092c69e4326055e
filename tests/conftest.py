"""Shared pytest fixtures: run the `illume-ref` CLI in-process or as a real subprocess; record the toy scenes a
module draws."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """Every test keeps its trained toy parts in a cache folder of its own session (`$ILLUME_REF_CACHE`), never in the
    user's `~/.cache/illume_ref`: a test neither reads a part trained elsewhere nor leaves one behind."""
    folder = tmp_path_factory.mktemp("illume_ref_cache")
    old = os.environ.get("ILLUME_REF_CACHE")
    os.environ["ILLUME_REF_CACHE"] = str(folder)
    yield folder
    if old is None: os.environ.pop("ILLUME_REF_CACHE", None)
    else: os.environ["ILLUME_REF_CACHE"] = old


@pytest.fixture
def recorded_scenes(monkeypatch):
    """`record(module)` swaps `module.sample_scenes` for the real sampler with its draws recorded, and returns the
    list that fills with `(split, scenes)` per call."""
    from illume_ref.toyworld import sample_scenes

    def record(module):
        drawn = []

        def recording(rng, n, world=None, split=None, **kw):
            scenes = sample_scenes(rng, n, world, split, **kw)
            drawn.append((split, scenes))
            return scenes
        monkeypatch.setattr(module, "sample_scenes", recording)
        return drawn
    return record


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
