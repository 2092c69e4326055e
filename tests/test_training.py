import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from illume_ref.config import TrainConfig
from illume_ref.training import (EMA, DamagedCheckpoint, Trainer, list_checkpoints, load_checkpoint,
                                 make_accelerator, param_groups, rng_state, save_checkpoint, set_rng_state)

ROOT = Path(__file__).resolve().parent.parent


def build(out, resume=False, steps=10, seed=3, schedule_steps=None, warmup_ema=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=3, log_every=1, warmup_steps=2, seed=seed,
                      schedule_steps=schedule_steps)
    tr = Trainer({"model": model}, opt, cfg, out, emas={"model": EMA(model, 0.8, warmup=warmup_ema)}, resume=resume,
                 progress=False)

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


def build16(out, resume=False, steps=6, overflow_at=0, device="cuda"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=2, log_every=1, seed=3, dtype="fp16")
    tr = Trainer({"model": model}, opt, cfg, out, resume=resume, progress=False, device=device)

    def step_fn(step):
        x = torch.tensor([[tr.rng(step).random() for _ in range(3)] for _ in range(4)], device=device)
        loss = ((tr.models["model"](x).float() - x.sum(1, keepdim=True)) ** 2).mean()
        return {"loss": loss * 1e35 if step == overflow_at else loss}   # finite, but overflows once scaled
    return tr, model, step_fn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs a GPU (the CPU trains in fp32)")
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")   # after the skipped step 0
def test_fp16_uses_accelerates_grad_scaler_and_resumes_exactly(tmp_path):
    "accelerate's loss scaler: skip and backoff on overflow, checkpointed in scaler.pt, restored on resume."
    a, ma, fa = build16(tmp_path / "a")
    assert a.accelerator.mixed_precision == "fp16" and isinstance(a.scaler, torch.amp.GradScaler)
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
    assert json.dumps(a.history) == json.dumps(b.history)                  # step 0's grad_norm is inf (overflow)


def test_fp16_and_bf16_on_the_cpu_train_in_fp32_without_a_scaler(tmp_path):
    for dtype in ("fp16", "bf16"):
        m = nn.Linear(2, 1)
        tr = Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), TrainConfig(dtype=dtype), tmp_path / dtype,
                     progress=False)
        assert tr.accelerator.mixed_precision == "no" and tr.scaler is None and tr.device.type == "cpu"
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


def test_nan_loss_names_the_step_and_tasks_and_keeps_the_checkpoints(tmp_path):
    tr, model, fn = build(tmp_path / "n")
    with pytest.raises(FloatingPointError, match="loss is nan at step 0; no checkpoint was written yet"):
        tr.fit(lambda step: {"loss": model(torch.full((1, 3), float("nan"))).sum()})
    tr.fit(fn, stop_at=3)                                                   # checkpoint at 3

    def bad(step):
        out = fn(step)
        return {**out, "loss": out["loss"] * float("inf") if step == 4 else out["loss"], "tasks": ["vqa", "caption", "vqa"]}
    with pytest.raises(FloatingPointError) as e:
        tr.fit(bad)
    assert str(e.value).startswith("train: loss is inf at step 4; tasks in the batch: caption, vqa x2; the last "
                                   "checkpoint (step-000003) is kept in")
    assert tr.step == 4 and [c.name for c in list_checkpoints(tmp_path / "n")] == ["step-000003"]
    cfg = TrainConfig(steps=4, grad_accum=2, log_every=1, save_every=10)
    m = nn.Linear(3, 1)
    tr = Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), cfg, tmp_path / "acc", progress=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 \(micro-step 2 of 2\); tasks in the batch: edit"):
        tr.fit(lambda s: {"loss": m(torch.ones(1, 3)).sum() * (float("nan") if s == 1 else 1.0), "tasks": "edit"})


# -- accelerate ---------------------------------------------------------------------------------------------

def test_the_trainer_runs_on_an_accelerator(tmp_path):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    tr, _, fn = build(tmp_path / "a")
    assert isinstance(tr.accelerator, Accelerator) and isinstance(tr.optimizer, AcceleratedOptimizer)
    assert (tr.accelerator.mixed_precision, tr.accelerator.gradient_accumulation_steps) == ("no", 1)
    m = nn.Linear(3, 1)
    cfg = TrainConfig(grad_accum=2)
    acc = make_accelerator(cfg, "cpu")
    tr = Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), cfg, tmp_path / "b", accelerator=acc, progress=False)
    assert tr.accelerator is acc and tr.accelerator.gradient_accumulation_steps == 2
    with pytest.raises(ValueError, match="accumulates gradients over 2 micro-steps, TrainConfig.grad_accum is 1"):
        Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), TrainConfig(), tmp_path / "c", accelerator=acc)


def test_a_second_precision_in_one_process_starts_accelerate_over(tmp_path):
    "accelerate's state is one per process: without the reset, the second Accelerator raises 'already initialized'."
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)                # as in a fresh process
    bf16 = Accelerator(cpu=True, mixed_precision="bf16")
    assert bf16.mixed_precision == "bf16"
    m = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="runs mixed_precision='bf16', TrainConfig.dtype='fp32' on cpu means 'no'"):
        Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), TrainConfig(dtype="fp32"), tmp_path / "a",
                accelerator=bf16)
    tr = Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), TrainConfig(steps=2), tmp_path / "b", progress=False)
    assert tr.accelerator.mixed_precision == "no"
    tr.fit(lambda s: {"loss": m(torch.ones(2, 3)).pow(2).mean()})


def _linear_run(out, grad_accum, batch, steps=6):
    "SGD on a linear model, the same 8 examples per step, split into `grad_accum` micro-batches of `batch`."
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    cfg = TrainConfig(lr=0.05, steps=steps, batch_size=batch, grad_accum=grad_accum, warmup_steps=2, log_every=1,
                      save_every=100, grad_clip=0.5)
    tr = Trainer({"m": m}, torch.optim.SGD(m.parameters(), lr=0.05), cfg, out, progress=False)

    def step_fn(micro):
        step, part = divmod(micro, grad_accum)
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)[part * batch:(part + 1) * batch]
        return {"loss": ((m(x) - x.sum(1, keepdim=True)) ** 2).mean()}
    tr.fit(step_fn)
    return tr, m


def test_gradient_accumulation_equals_one_big_batch_and_the_lr_steps_once_per_optimizer_step(tmp_path):
    big, m1 = _linear_run(tmp_path / "a", grad_accum=1, batch=8)
    acc, m2 = _linear_run(tmp_path / "b", grad_accum=2, batch=4)
    torch.testing.assert_close(m1.weight, m2.weight, rtol=1e-6, atol=1e-7)
    assert [h["lr"] for h in acc.history] == [h["lr"] for h in big.history]
    assert acc.scheduler.last_epoch == 6 == acc.step
    for h, g in zip(acc.history, big.history):
        assert h["loss"] == pytest.approx(g["loss"], rel=1e-6) and h["grad_norm"] == pytest.approx(g["grad_norm"], rel=1e-5)


def test_python_and_numpy_generators_are_checkpointed_and_restored(tmp_path):
    "A step function drawing from python's `random` and numpy's global generator resumes exactly too."
    def run(out, resume=False, stop_at=None):
        random.seed(0); np.random.seed(0)                                 # what a fresh process would start from
        tr, model, _ = build(out, resume=resume, steps=8)
        fn = lambda s: {"loss": (model(torch.tensor([[random.random(), np.random.rand(), 1.0]])) - 1).pow(2).mean()}
        tr.fit(fn, stop_at=stop_at)
        return tr, model
    _, a = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=7)                                         # checkpoint at 6
    tr, b = run(tmp_path / "b", resume=True)
    assert tr.step == 8 and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.load(list_checkpoints(tmp_path / "b")[-1] / "rng_state_0.pt", weights_only=True)
    assert {"python", "numpy", "cpu"} <= set(state)
    ck = list_checkpoints(tmp_path / "b")[0]                               # step 6
    (ck / "rng_state_0.pt").write_bytes(b"cut")
    for later in list_checkpoints(tmp_path / "b")[1:]: import shutil; shutil.rmtree(later)
    with pytest.raises(DamagedCheckpoint, match=r"rng_state_0.pt"):
        build(tmp_path / "b", resume=True, steps=8)


def test_rng_state_round_trip():
    saved = rng_state()
    drawn = random.random(), float(np.random.rand()), torch.rand(2)
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand())) == drawn[:2] and torch.equal(torch.rand(2), drawn[2])
    assert "npu" not in saved or saved["npu"]                              # only where an NPU is


def test_history_logs_each_groups_lr_and_tokens_per_second(tmp_path):
    net = nn.ModuleDict({"adapter": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    opt = torch.optim.AdamW(param_groups({k: net[k] for k in net}, {"adapter": 1e-3, "head": 2e-4}))
    tr = Trainer({"net": net}, opt, TrainConfig(steps=4, log_every=2, save_every=4, warmup_steps=0), tmp_path,
                 progress=False)
    x = torch.randn(8, 3)
    hist = tr.fit(lambda s: {"loss": net["head"](net["adapter"](x)).pow(2).mean(), "num_tokens": torch.tensor(24),
                             "tasks": ["caption"] * 8})
    assert [h["step"] for h in hist] == [2, 4]
    assert hist[0]["lr/adapter"] == hist[0]["lr/adapter.no_decay"] == hist[0]["lr"] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert hist[0]["lr/head"] == pytest.approx(hist[0]["lr/adapter"] / 5)
    assert hist[1]["tokens_per_second"] > 0 and "tasks" not in hist[1] and "num_tokens" not in hist[1]
    plain = Trainer({"m": nn.Linear(2, 1)}, torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1),
                    TrainConfig(steps=1), tmp_path / "p", progress=False)
    assert "lr/0" in plain.fit(lambda s: {"loss": torch.ones((), requires_grad=True)})[0]   # unnamed group: its index


# -- parameter groups and EMA -------------------------------------------------------------------------------

def test_param_groups_split_decay_give_each_group_its_lr_and_freeze_the_rest():
    net = nn.ModuleDict({"adapter": nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), "embed": nn.Embedding(10, 4),
                         "llm": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))})
    groups = param_groups({k: net[k] for k in net}, {"adapter": 1e-3, "embed": 2e-4}, weight_decay=0.1)
    assert [(g["name"], [p.shape for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups] == [
        ("adapter", [(8, 4)], 1e-3, 0.1), ("adapter.no_decay", [(8,), (8,), (8,)], 1e-3, 0.0),
        ("embed", [(10, 4)], 2e-4, 0.1)]
    assert not any(p.requires_grad for p in net["llm"].parameters())
    no_emb = param_groups({"embed": net["embed"]}, {"embed": 1.0}, 0.1, decay_embeddings=False)
    assert [g["name"] for g in no_emb] == ["embed.no_decay"]
    named = param_groups({"a": [("x.weight", net["llm"][0].weight), ("x.bias", net["llm"][0].bias)]}, {"a": 1.0}, 0.1)
    assert [len(g["params"]) for g in named] == [1, 1] and net["llm"][0].weight.requires_grad   # trained again
    plain = param_groups({"a": list(net["llm"][1].parameters())}, {"a": 1.0}, 0.1)
    assert [g["name"] for g in plain] == ["a", "a.no_decay"]


def test_param_groups_a_trained_group_inside_a_frozen_one_trains():
    "Stage 1: the visual embedding rows train while the rest of the LLM is frozen."
    llm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    groups = param_groups({"llm": llm, "visual_embed": [("embed.weight", llm[0].weight)]}, {"visual_embed": 2e-4})
    assert [g["name"] for g in groups] == ["visual_embed"]
    assert llm[0].weight.requires_grad and not llm[1].weight.requires_grad


def test_param_groups_refuse_bad_input_by_name():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="parameter 'w' of group 'b' is also 'weight' of group 'a'"):
        param_groups({"a": a, "b": [("w", a.weight)]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="'adaptr', which is not one of a, b"):
        param_groups({"a": a, "b": b}, {"adaptr": 1.0})
    for lr in (0, -1.0, float("nan"), "1e-3", True):
        with pytest.raises(ValueError, match="learning rate of parameter group 'a' must be a positive number"):
            param_groups({"a": a}, {"a": lr})
    with pytest.raises(ValueError, match="parameter group 'a' has no parameters"):
        param_groups({"a": []}, {"a": 1.0})
    with pytest.raises(TypeError, match="parameter group 'a': item 1 is a str"):
        param_groups({"a": [a.weight, "bias"]}, {"a": 1.0})
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        param_groups({"a": a}, {"a": 1.0}, weight_decay=-0.1)
    tied = nn.Linear(2, 2); tied2 = nn.Linear(2, 2); tied2.weight = tied.weight
    groups = param_groups({"a": nn.ModuleList([tied, tied2])}, {"a": 1.0})
    assert sum(len(g["params"]) for g in groups) == 3                       # the shared weight once


def test_ema_warmup_decay_matches_the_decoders_formula_and_resumes(tmp_path):
    "decoder.WarmupEMA: update n (1, 2, ...) uses min(decay, (1 + n) / (10 + n)); its count is saved."
    model = nn.Linear(2, 2)
    ema, shadow = EMA(model, 0.9, warmup=True), model.weight.detach().clone()
    for n in range(1, 40):
        with torch.no_grad(): model.weight.add_(0.1)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = shadow + (model.weight.detach() - shadow) * (1 - d)
    torch.testing.assert_close(ema.shadow["weight"], shadow)
    assert ema.state_dict()["ema.num_updates"].item() == 39 and "ema.num_updates" not in EMA(model).state_dict()
    again = EMA(model, 0.9, warmup=True); again.load_state_dict(ema.state_dict())
    assert again.num_updates == 39 and again.current_decay() == pytest.approx(41 / 50)   # update 40
    straight, a, fn = build(tmp_path / "a", warmup_ema=True); straight.fit(fn)
    tr, _, fn = build(tmp_path / "b", warmup_ema=True); tr.fit(fn, stop_at=7)
    tr, b, fn = build(tmp_path / "b", resume=True, warmup_ema=True)
    assert tr.emas["model"].num_updates == 6
    tr.fit(fn)
    _assert_same(straight.emas["model"].state_dict(), tr.emas["model"].state_dict(), "ema")


# -- launch configs -----------------------------------------------------------------------------------------

def _launch(config_file):
    "What `accelerate launch --config_file F -m illume_ref.cli train` makes of F: (config, args, environment)."
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    config = load_config_from_file(str(config_file))
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            dest = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert dest in known, f"{config_file.name}: {section}.{key} is not an accelerate launch option"
    args, defaults, mp_from_config = _validate_launch_command(
        parser.parse_args(["--config_file", str(config_file), "-m", "illume_ref.cli", "train"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        return config, args, prepare_deepspeed_cmd_env(args)[1]
    return config, args, prepare_multi_gpu_env(args) if (args.multi_gpu or args.use_fsdp) else {}


def test_the_launch_configs_load_with_accelerate(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, patch_environment
    monkeypatch.chdir(ROOT)
    folder = ROOT / ".ci" / "accelerate"
    expected = {"single_gpu.yaml": (DistributedType.NO, 1), "fsdp2_8gpu.yaml": (DistributedType.FSDP, 8),
                "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8), "npu_8.yaml": (DistributedType.MULTI_NPU, 8)}
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes) in expected.items():
        config, args, env = _launch(folder / name)
        assert (config.distributed_type, config.num_processes) == (kind, processes), name
        assert config.distributed_type in list(DistributedType)
        assert config.mixed_precision in ("bf16", None), name                 # DeepSpeed: in zero3.json
    config, args, env = _launch(folder / "fsdp2_8gpu.yaml")
    fsdp_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert fsdp_env["ACCELERATE_USE_FSDP"] == "true" and fsdp_env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with patch_environment(**fsdp_env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is False and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    config, args, env = _launch(folder / "deepspeed_zero3.yaml")
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert {ds[k] for k in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu")} == {"auto"}
    plugin.set_mixed_precision("bf16")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


# -- several processes (torchrun, gloo) ---------------------------------------------------------------------

SCRIPT = str(Path(__file__).with_name("_dist_trainer.py"))


def _torchrun(*args, n=2, script=SCRIPT):
    "Run `script` under torchrun; the generous timeout leaves room for a machine shared with other jobs."
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_encoder_tokenizer_and_decoder_train_in_sync_on_two_processes(tmp_path):
    """The toy ViT's pretraining, the tokenizer and the diffusion decoder each step through their DDP wrapper: the
    two processes draw different scenes and still end with the same weights (calling the bare modules, as the decoder
    once did, leaves each process with its own)."""
    _torchrun(str(tmp_path), script=str(Path(__file__).with_name("_dist_parts.py")))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["encoder"] != r0["initial_encoder"]                  # the encoder did train
    assert (tmp_path / "decoder" / "pipeline" / "model_index.json").exists() and (tmp_path / "tokenizer" / "history.json").exists()


def test_ddp_two_processes_agree_and_resume(tmp_path):
    _torchrun(str(tmp_path / "x"), "fresh", "none")
    w0, w1 = (torch.load(tmp_path / "x" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    _torchrun(str(tmp_path / "y"), "fresh", "5")
    _torchrun(str(tmp_path / "y"), "resume", "none")
    y0 = torch.load(tmp_path / "y" / "rank0.pt")
    assert all(torch.equal(w0[k], y0[k]) for k in w0)
    assert [c.name for c in list_checkpoints(tmp_path / "x" / "run")] == ["step-000006", "step-000008"]
    ck = list_checkpoints(tmp_path / "x" / "run")[-1]
    assert {"rng_state_0.pt", "rng_state_1.pt", "optimizer.pt"} <= {p.name for p in ck.iterdir()}
    assert json.loads((ck / "trainer_state.json").read_text())["num_processes"] == 2


# 1 process with batch 8 against 2 with 4 each (the same examples): the losses differ only by the order of the
# floating-point sums (measured: at most 1.5e-7 relative with DDP, 9e-8 with FSDP2, over 8 steps)
CURVE_RTOL = 1e-6


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_with_half_batches_follow_one_process_with_the_whole_batch(tmp_path, engine):
    _torchrun(str(tmp_path / "one"), "fresh", "none", "ddp", "global", n=1)
    _torchrun(str(tmp_path / "two"), "fresh", "none", engine, "global")
    one, two = (json.loads((tmp_path / r / "history.json").read_text()) for r in ("one", "two"))
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=CURVE_RTOL) and b["lr"] == a["lr"]
    w1, w2 = (torch.load(tmp_path / r / "rank0.pt") for r in ("one", "two"))
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=CURVE_RTOL, atol=1e-6)


def test_fsdp2_through_accelerate_resumes_exactly(tmp_path):
    "accelerate's FSDP2 path on gloo: sharded `accelerate/` checkpoints, and a resumed run equals a straight one."
    _torchrun(str(tmp_path / "a"), "fresh", "none", "fsdp2")
    _torchrun(str(tmp_path / "b"), "fresh", "5", "fsdp2")
    _torchrun(str(tmp_path / "b"), "resume", "none", "fsdp2")
    a, b = (torch.load(tmp_path / r / "rank0.pt") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = list_checkpoints(tmp_path / "a" / "run")[-1]
    assert {"accelerate", "model.safetensors", "rng_state_0.pt", "rng_state_1.pt", "scheduler.pt"} <= {p.name for p in ck.iterdir()}
    assert not (ck / "optimizer.pt").exists()                              # the optimizer is in accelerate/ (sharded)
    assert load_checkpoint(ck, {"model": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))})["step"] == 8
