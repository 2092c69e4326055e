"""Run under `torchrun --nproc_per_node N`: training through `Trainer` on CPU processes (gloo).

    _dist_trainer.py OUT fresh|resume STOP|none [ddp|fsdp2] [rank|global]

- engine `ddp`: the Trainer builds its Accelerator (`cpu=True`: accelerate's MULTI_CPU, DDP over gloo);
  `fsdp2`: an Accelerator with `FullyShardedDataParallelPlugin(fsdp_version=2)`, switched to accelerate's FSDP
  code path (accelerate 1.15 turns every `cpu=True` launch into MULTI_CPU and ignores the plugin without a word).
- data `rank`: each process draws its own batch of 4 from `Trainer.rng(step)`; `global`: every process draws the
  same 8 examples from `step_rng(seed, step)` and trains on its share (8 / N), so N processes see one batch of 8.

Writes OUT/rank{r}.pt (the full weights: every rank under DDP, rank 0 under FSDP2) and OUT/history.json (rank 0).
"""
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from illume_ref.config import TrainConfig
from illume_ref.training import Trainer, make_accelerator, param_groups, step_rng

GLOBAL_BATCH = 8


def fsdp2_accelerator(cfg: TrainConfig):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
    acc = make_accelerator(cfg, "cpu", fsdp_plugin=plugin)
    assert acc.distributed_type == DistributedType.MULTI_CPU                   # the plugin was ignored
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert acc.is_fsdp2
    return acc


def main(out: str, resume: bool, stop_at: int | None, engine: str, data: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    cfg = TrainConfig(lr=0.05, steps=8, batch_size=4, save_every=3, log_every=1, warmup_steps=2, seed=1)
    opt = torch.optim.AdamW(param_groups({"model": model}, {"model": cfg.lr}, weight_decay=0.01))
    acc = fsdp2_accelerator(cfg) if engine == "fsdp2" else None
    tr = Trainer({"model": model}, opt, cfg, Path(out) / "run", resume=resume, progress=False, accelerator=acc)
    acc = tr.accelerator
    assert acc.num_processes == int(os.environ["WORLD_SIZE"])

    def step_fn(step):
        g, n = (tr.rng(step), cfg.batch_size) if data == "rank" else (step_rng(cfg.seed, step), GLOBAL_BATCH)
        x = torch.tensor([[g.gauss(0, 1) for _ in range(4)] for _ in range(n)])
        if data == "global": x = x.chunk(acc.num_processes)[acc.process_index]
        return {"loss": ((tr.models["model"](x) - x.sum(1, keepdim=True)) ** 2).mean(), "num_tokens": len(x)}

    tr.fit(step_fn, stop_at=stop_at)
    weights = acc.get_state_dict(tr.models["model"])                          # under FSDP2: rank 0 only
    if engine == "ddp" or acc.is_main_process: torch.save(weights, Path(out) / f"rank{acc.process_index}.pt")
    if acc.is_main_process: (Path(out) / "history.json").write_text(json.dumps(tr.history))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()


if __name__ == "__main__":
    out, mode, stop = sys.argv[1:4]
    engine, data = (sys.argv[4:6] + ["ddp", "rank"][len(sys.argv[4:6]):])
    main(out, mode == "resume", None if stop == "none" else int(stop), engine, data)
    # leave without the interpreter's teardown: once in a few dozen runs a process hung there, idle, after main()
    # had written everything and its peer had exited (gloo teardown); the test reads only the files written above
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
