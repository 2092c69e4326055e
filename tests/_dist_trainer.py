"""Run under `torchrun --nproc_per_node 2`: DDP training through `Trainer` on CPU (gloo).
Writes each rank's final weights to OUT/rank{r}.pt."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from illume_ref.config import TrainConfig
from illume_ref.training import Trainer


def main(out: str, resume: bool, stop_at: int | None):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = TrainConfig(lr=0.05, steps=8, batch_size=4, save_every=3, log_every=1, seed=1)
    tr = Trainer({"model": model}, opt, cfg, Path(out) / "run", resume=resume, progress=False)

    def step_fn(step):
        g = tr.rng(step)  # differs per rank: each rank sees its own data
        x = torch.tensor([[g.gauss(0, 1) for _ in range(4)] for _ in range(4)])
        return {"loss": ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()}

    tr.fit(step_fn, stop_at=stop_at)
    torch.save(model.module.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    stop = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "none" else None
    main(sys.argv[1], sys.argv[2] == "resume", stop)
