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


def test_written_files_are_readable_like_any_new_file(tmp_path):
    "save_json and save_safetensors go through a temporary file, but the result has the umask's mode, not 0600."
    old = os.umask(0o022)
    try:
        j = core.save_json({"a": 1}, tmp_path / "a.json")
        w = core.save_safetensors({"x": torch.ones(2)}, tmp_path / "w.safetensors")
        with core.atomic_dir(tmp_path / "saved") as tmp: (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert oct(j.stat().st_mode & 0o777) == oct(0o644) and oct(w.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "saved").stat().st_mode & 0o777) == oct(0o755)


def test_bad_weights_files_are_named(tmp_path):
    w = core.save_safetensors({"x": torch.ones(4)}, tmp_path / "w.safetensors")
    w.write_bytes(w.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"w\.safetensors.*not a complete safetensors"):
        core.load_safetensors(w)
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"t\.safetensors"):
        core.load_safetensors(tmp_path / "t.safetensors")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        core.load_safetensors(tmp_path / "none.safetensors")


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with core.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_open_image_reads_what_a_viewer_shows(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((12, 12), 65535 // 4, np.uint16)).save(tmp_path / "g16.png")
    assert core.open_image(tmp_path / "g16.png").getpixel((0, 0)) == (64, 64, 64)
    rgba = np.zeros((12, 12, 4), np.uint8); rgba[..., 1] = 255                 # green, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert core.open_image(tmp_path / "clear.png", background=(245, 245, 245)).getpixel((5, 5)) == (245, 245, 245)
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"dot\.png' is 1x1 px: expected at least 8 px"):
        core.open_image(tmp_path / "dot.png")
    Image.new("RGB", (4000, 2)).save(tmp_path / "line.png")
    with pytest.raises(ValueError, match="4000x2 px"):
        core.open_image(tmp_path / "line.png")
    (tmp_path / "x.png").write_bytes(b"GIF89a nonsense")
    with pytest.raises(ValueError, match=r"cannot read image '.*x\.png'"):
        core.open_image(tmp_path / "x.png")


def test_pad_to_square_keeps_the_aspect_ratio():
    from PIL import Image
    wide = Image.new("RGB", (30, 10), (245, 245, 245)); wide.paste((0, 0, 200), (0, 0, 10, 10))
    sq = core.pad_to_square(wide)
    assert sq.size == (30, 30) and sq.getpixel((5, 15)) == (0, 0, 200) and sq.getpixel((5, 2)) == (245, 245, 245)
    assert core.pad_to_square(sq) is sq
