import contextlib
import json
import os
import random

import numpy as np
import pytest
import torch

from illume_ref import core


@contextlib.contextmanager
def pretend(**usable):
    saved = dict(core.DEVICE_PROBES)
    for kind, ok in usable.items():
        core.DEVICE_PROBES[kind] = (lambda ok=ok, kind=kind: (ok, f"{kind} pretend-missing"))
    try:
        yield
    finally:
        core.DEVICE_PROBES.clear()
        core.DEVICE_PROBES.update(saved)


@pytest.mark.parametrize("usable,expected", [
    (dict(cuda=True, npu=True, mps=True), "cuda"),
    (dict(cuda=False, npu=True, mps=True), "npu"),
    (dict(cuda=False, npu=False, mps=True), "mps"),
    (dict(cuda=False, npu=False, mps=False), "cpu"),
])
def test_device_preference_order(usable, expected):
    with pretend(**usable):
        assert core.select_device() == expected
        assert core.select_device("auto") == expected


def test_device_explicit_and_env(monkeypatch):
    with pretend(cuda=True, npu=False):
        assert core.select_device("cpu") == "cpu"
        assert core.select_device("CUDA:1") == "cuda:1"
        with pytest.raises(RuntimeError, match="'npu' was asked for but is not usable: npu pretend-missing"):
            core.select_device("npu")
        monkeypatch.setenv("ILLUME_REF_DEVICE", "cpu")
        assert core.select_device() == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        core.select_device("tpu")
    with pytest.raises(ValueError, match="index"):
        core.select_device("cpu:x")
    assert core.get_device("cpu") == torch.device("cpu")


def test_npu_without_torch_npu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(core.importlib.util, "find_spec", lambda name: None)
    ok, reason = core._npu_status()
    assert not ok and "pip install 'illume_ref[npu]'" in reason and "CANN" in reason
    with pytest.raises(RuntimeError, match=r"illume_ref\[npu\]"):
        core.get_device("npu")


def test_seed_everything_reproduces_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), torch.randn(3).tolist()
    core.seed_everything(11); a = draw()
    core.seed_everything(11); b = draw()
    core.seed_everything(12); c = draw()
    assert a == b and a != c
    with pytest.raises(ValueError, match="non-negative int"):
        core.seed_everything(1.5)


def test_dtype_policy():
    assert core.default_dtype("cpu") == torch.float32
    assert core.default_dtype("npu") == torch.bfloat16
    assert core.resolve_dtype("fp16") == torch.float16
    assert core.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        core.resolve_dtype("half")
    with core.autocast("cpu"):
        assert torch.ones(2).dtype == torch.float32


def test_in_test_and_work_size(monkeypatch):
    monkeypatch.setenv("IN_TEST", "1")
    assert core.in_test() and core.work_size(100, 3) == 3
    monkeypatch.delenv("IN_TEST")
    assert not core.in_test() and core.work_size(100, 3) == 100


def test_run_dirs_never_overwrite(tmp_path):
    a = core.new_run_dir(tmp_path / "run")
    (a / "x.txt").write_text("keep me")
    b = core.new_run_dir(tmp_path / "run")
    (b / "y.txt").write_text("and me")
    c = core.new_run_dir(tmp_path / "run")
    assert [p.name for p in (a, b, c)] == ["run", "run-2", "run-3"]
    assert (a / "x.txt").read_text() == "keep me"
    assert core.new_run_dir(tmp_path / "run", exist_ok=True) == a


def test_json_atomic_and_errors(tmp_path):
    p = core.save_json({"a": np.float32(0.5), "b": [1, 2]}, tmp_path / "sub" / "s.json")
    assert json.loads(p.read_text()) == {"a": 0.5, "b": [1, 2]}
    assert not [f for f in os.listdir(p.parent) if f.endswith(".tmp")]
    with pytest.raises(TypeError):
        core.save_json({"a": object()}, p)
    assert core.load_json(p) == {"a": 0.5, "b": [1, 2]}  # the failed write left the old file intact
    (tmp_path / "bad.json").write_text("{\n\n  nope")
    with pytest.raises(ValueError, match=r"bad.json' at line 3"):
        core.load_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        core.load_json(tmp_path / "missing.json")
