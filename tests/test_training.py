import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from illume_ref.config import TrainConfig
from illume_ref.training import EMA, Trainer, list_checkpoints, load_checkpoint, save_checkpoint


def build(out, resume=False, steps=10, seed=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=3, log_every=1, warmup_steps=2, seed=seed)
    tr = Trainer({"model": model}, opt, cfg, out, emas={"model": EMA(model, 0.8)}, resume=resume, progress=False)

    def step_fn(step):
        g = tr.rng(step)
        x = torch.tensor([[g.random() for _ in range(3)] for _ in range(4)])
        return {"loss": ((model(x) - x.sum(1, keepdim=True) + 0.01 * torch.randn(4, 1)) ** 2).mean()}
    return tr, model, step_fn


def test_resume_is_bit_identical(tmp_path):
    tr, a, fn = build(tmp_path / "a"); tr.fit(fn)
    tr, _, fn = build(tmp_path / "b"); tr.fit(fn, stop_at=7)
    tr, b, fn = build(tmp_path / "b", resume=True)
    assert tr.step == 6
    tr.fit(fn)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = load_checkpoint(list_checkpoints(tmp_path / "a")[-1], {"model": a})
    assert state["step"] == 10 and len(state["history"]) == 10


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
