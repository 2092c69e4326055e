import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from illume_ref.config import TrainConfig
from illume_ref.training import (EMA, DamagedCheckpoint, Trainer, list_checkpoints, load_checkpoint,
                                 save_checkpoint)


def build(out, resume=False, steps=10, seed=3, schedule_steps=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=3, log_every=1, warmup_steps=2, seed=seed,
                      schedule_steps=schedule_steps)
    tr = Trainer({"model": model}, opt, cfg, out, emas={"model": EMA(model, 0.8)}, resume=resume, progress=False)

    def step_fn(step):
        g = tr.rng(step)
        x = torch.tensor([[g.random() for _ in range(3)] for _ in range(4)])
        return {"loss": ((model(x) - x.sum(1, keepdim=True) + 0.01 * torch.randn(4, 1)) ** 2).mean()}
    return tr, model, step_fn


def _assert_same(x, y, where=""):
    "Recursive equality of (nested) state dicts: tensors bit for bit."
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x: _assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)): _assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, (where, x, y)


def test_resume_is_bit_identical(tmp_path):
    straight, a, fn = build(tmp_path / "a"); straight.fit(fn)
    tr, _, fn = build(tmp_path / "b"); tr.fit(fn, stop_at=7)
    tr, b, fn = build(tmp_path / "b", resume=True)
    assert tr.step == 6
    tr.fit(fn)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    _assert_same(straight.emas["model"].shadow, tr.emas["model"].shadow, "ema")
    _assert_same(straight.optimizer.state_dict(), tr.optimizer.state_dict(), "optimizer")
    _assert_same(straight.scheduler.state_dict(), tr.scheduler.state_dict(), "scheduler")
    assert tr.history == straight.history and len(tr.history) == 10
    state = load_checkpoint(list_checkpoints(tmp_path / "a")[-1], {"model": a})
    assert state["step"] == 10 and len(state["history"]) == 10
    assert state["history"] == straight.history


def test_resume_refuses_a_changed_config_but_lets_steps_grow(tmp_path):
    tr, _, fn = build(tmp_path / "r", steps=6); tr.fit(fn)                 # checkpoints at 3 and 6
    with pytest.raises(ValueError, match=r"seed: saved 3, now 4"):
        build(tmp_path / "r", resume=True, steps=6, seed=4)
    cfg = TrainConfig(lr=1e-3, steps=6, batch_size=2, save_every=3, log_every=1, warmup_steps=2, seed=3, grad_accum=2)
    with pytest.raises(ValueError) as e:
        Trainer({"model": nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))},
                torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3), cfg, tmp_path / "r", resume=True, progress=False)
    for part in ("lr: saved 0.01, now 0.001", "batch_size: saved 4, now 2", "grad_accum: saved 1, now 2", "step-000006"):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="steps: now 5, below the step 6 already reached"):
        build(tmp_path / "r", resume=True, steps=5)
    # the cosine schedule spans the whole run: an extension keeps the one it started with, another is refused
    with pytest.raises(ValueError, match=r"LR schedule: saved over 6 steps, now over 8 .*keep schedule_steps=6"):
        build(tmp_path / "r", resume=True, steps=8, schedule_steps=8)
    tr, _, fn = build(tmp_path / "r", resume=True, steps=8)               # extending a run is fine
    assert tr.step == 6 and tr.train.schedule_steps == 6 and tr.fit(fn)[-1]["step"] == 8
    assert load_checkpoint(list_checkpoints(tmp_path / "r")[-1], {"model": build(tmp_path / "x")[1]})["train"][
        "schedule_steps"] == 6                                             # recorded, so the next resume keeps it too


def test_an_extended_run_equals_a_straight_run_of_its_config(tmp_path, caplog):
    "6 steps, then --resume to 8 with the 6-step schedule kept == one run of steps=8, schedule_steps=6 (bit for bit)."
    straight, a, fn = build(tmp_path / "a", steps=8, schedule_steps=6); straight.fit(fn)
    tr, _, fn = build(tmp_path / "b", steps=6); tr.fit(fn)
    with caplog.at_level("WARNING", logger="illume_ref.training"):
        tr, b, fn = build(tmp_path / "b", resume=True, steps=8)
    assert "goes from 6 to 8 steps and keeps its LR schedule (warm-up + cosine over 6 steps)" in caplog.text
    tr.fit(fn)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert tr.history == straight.history
    lrs = [h["lr"] for h in tr.history]
    assert lrs[5] == lrs[6] == lrs[7] == pytest.approx(0.1 * 1e-2)        # past its schedule: the final (floor) LR
    assert lrs[4] > lrs[5]


def _truncate(path, keep=40):
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(tmp_path, caplog):
    straight, a, fn = build(tmp_path / "a", steps=8); straight.fit(fn)
    tr, _, fn = build(tmp_path / "b", steps=8); tr.fit(fn, stop_at=7)              # checkpoints at 3 and 6
    _truncate(tmp_path / "b" / "checkpoints" / "step-000006" / "model.safetensors")
    with caplog.at_level("WARNING", logger="illume_ref.training"):
        tr, b, fn = build(tmp_path / "b", resume=True, steps=8)
    assert tr.step == 3
    message = caplog.text
    assert "step-000003" in message and "step-000006" in message and "model.safetensors" in message
    tr.fit(fn)                                                                       # still exact from step 3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # an unreadable optimizer state is skipped the same way; when nothing can be read, the error names every file
    ck = list_checkpoints(tmp_path / "b")
    _truncate(ck[-1] / "optimizer.pt"); (ck[0] / "trainer_state.json").write_text("{")
    with pytest.raises(DamagedCheckpoint) as e:
        build(tmp_path / "b", resume=True, steps=8)
    assert "optimizer.pt" in str(e.value) and "trainer_state.json" in str(e.value) and "line 1" in str(e.value)


def test_damaged_files_are_named_and_load_nothing(tmp_path):
    m = nn.Linear(3, 2)
    ck = save_checkpoint(tmp_path / "ck", {"m": m}, state={"step": 1})
    target = nn.Linear(3, 2); before = target.weight.detach().clone()
    _truncate(ck / "m.safetensors")
    with pytest.raises(ValueError, match=r"cannot read weights '.*m\.safetensors' \(40 bytes\)"):
        load_checkpoint(ck, {"m": target})
    (ck / "m.safetensors").write_text("not safetensors at all")
    with pytest.raises(ValueError, match=r"m\.safetensors"):
        load_checkpoint(ck, {"m": target})
    assert torch.equal(target.weight, before)
    # two models, the second one damaged: the first is not loaded either
    ck2 = save_checkpoint(tmp_path / "ck2", {"a": m, "b": m}, state={"step": 1})
    _truncate(ck2 / "b.safetensors")
    with pytest.raises(DamagedCheckpoint):
        load_checkpoint(ck2, {"a": target, "b": nn.Linear(3, 2)})
    assert torch.equal(target.weight, before)


def test_checkpoints_are_written_atomically_with_normal_permissions(tmp_path):
    class Broken:
        def state_dict(self): raise RuntimeError("disk full")
    m = nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root / "step-000001", {"m": m}, state={"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(root / "step-000001", {"m": nn.Linear(2, 2)}, optimizer=Broken(), state={"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(root / "step-000002", {"m": m}, optimizer=Broken(), state={"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]        # no half-written folder is left
    fresh = nn.Linear(2, 2); load_checkpoint(first, {"m": fresh})
    assert torch.equal(fresh.weight, m.weight)                                 # the old checkpoint is intact
    umask = os.umask(0); os.umask(umask)
    assert (first / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask


def test_stop_at_zero_keep_last_and_checkpoint_order(tmp_path):
    tr, _, fn = build(tmp_path / "z")
    tr.fit(fn, stop_at=0)
    assert tr.step == 0 and list_checkpoints(tmp_path / "z") == []
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        Trainer({"m": nn.Linear(1, 1)}, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), TrainConfig(),
                tmp_path / "k", keep_last=0)
    for n in (1_000_000, 999_999, 12):
        save_checkpoint(tmp_path / "o" / "checkpoints" / f"step-{n:06d}", {"m": nn.Linear(1, 1)}, state={"step": n})
    (tmp_path / "o" / "checkpoints" / "step-notes").mkdir()
    assert [c.name for c in list_checkpoints(tmp_path / "o")] == ["step-000012", "step-999999", "step-1000000"]


def build16(out, resume=False, steps=6, overflow_at=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=2, log_every=1, seed=3, dtype="fp16")
    tr = Trainer({"model": model}, opt, cfg, out, resume=resume, progress=False)

    def step_fn(step):
        x = torch.tensor([[tr.rng(step).random() for _ in range(3)] for _ in range(4)])
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        return {"loss": loss * 1e35 if step == overflow_at else loss}   # finite, but overflows once scaled
    return tr, model, step_fn


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")   # after the skipped step 0
def test_fp16_uses_a_grad_scaler_and_resumes_exactly(tmp_path):
    "core.autocast keeps the CPU in fp32, so this checks the scaler bookkeeping (skip, backoff, checkpoint, resume)."
    a, ma, fa = build16(tmp_path / "a")
    assert isinstance(a.scaler, torch.amp.GradScaler) and build(tmp_path / "fp32")[0].scaler is None
    before = [p.detach().clone() for p in ma.parameters()]
    a.fit(fa, stop_at=1)
    assert all(torch.equal(p, q) for p, q in zip(before, ma.parameters()))   # the overflowing step was skipped
    assert a.scaler.get_scale() == 2.0 ** 15
    a.fit(fa)
    assert [h["loss_scale"] for h in a.history] == [2.0 ** 16] + [2.0 ** 15] * 5
    assert (list_checkpoints(tmp_path / "a")[-1] / "scaler.pt").exists()
    b, _, fb = build16(tmp_path / "b"); b.fit(fb, stop_at=3)
    b, mb, fb = build16(tmp_path / "b", resume=True)
    assert b.step == 2 and b.scaler.get_scale() == 2.0 ** 15                # restored from scaler.pt
    b.fit(fb)
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    _assert_same(a.scaler.state_dict(), b.scaler.state_dict(), "scaler")
    _assert_same(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    assert json.dumps(a.history) == json.dumps(b.history)                  # step 1's grad_norm is nan (overflow)
    with pytest.raises(FileNotFoundError, match=r"no loss-scaler state \(scaler.pt\)"):
        load_checkpoint(save_checkpoint(tmp_path / "ck", {"m": nn.Linear(1, 1)}, state={"step": 1}),
                        {"m": nn.Linear(1, 1)}, scaler=torch.amp.GradScaler("cpu"))


def test_a_different_seed_gives_different_weights(tmp_path):
    tr1, a, fn1 = build(tmp_path / "c", seed=1); tr1.fit(fn1)
    tr2, b, fn2 = build(tmp_path / "d", seed=2); tr2.fit(fn2)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_refuses_to_overwrite_and_names_mismatches(tmp_path):
    tr, _, fn = build(tmp_path / "a", steps=3); tr.fit(fn)
    with pytest.raises(FileExistsError, match="already holds checkpoints .*step-000003"):
        build(tmp_path / "a")
    save_checkpoint(tmp_path / "ck", {"m": nn.Linear(2, 3)}, state={"step": 0})
    with pytest.raises(ValueError, match="does not match model 'm'"):
        load_checkpoint(tmp_path / "ck", {"m": nn.Linear(2, 4)})
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "nothing", {"m": nn.Linear(2, 3)})


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    tr, model, _ = build(tmp_path / "n")
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        tr.fit(lambda step: {"loss": model(torch.full((1, 3), float("nan"))).sum()})


def _torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_ddp_two_processes_agree_and_resume(tmp_path):
    script = str(Path(__file__).with_name("_dist_trainer.py"))
    _torchrun(script, str(tmp_path / "x"), "fresh", "none")
    w0, w1 = (torch.load(tmp_path / "x" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    _torchrun(script, str(tmp_path / "y"), "fresh", "5")
    _torchrun(script, str(tmp_path / "y"), "resume", "none")
    y0 = torch.load(tmp_path / "y" / "rank0.pt")
    assert all(torch.equal(w0[k], y0[k]) for k in w0)
    assert [c.name for c in list_checkpoints(tmp_path / "x" / "run")] == ["step-000006", "step-000008"]
