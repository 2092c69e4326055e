"""Two-process check of `VectorQuantizer` under torch.distributed (gloo, CPU). Launched by
tests/test_quantizer.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_quantizer.py OUT_DIR [--no-sync]

Every rank builds the same quantizers (same seed), then feeds them *different* data and draws
different random numbers, runs a few training steps, and saves its state_dict to OUT_DIR. With
synchronisation the saved states must be identical across ranks; with `--no-sync` they must not.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from illume_ref.quantizer import VectorQuantizer

# threshold 4 (vectors per global batch of 2 x 80): codes that k-means gave one vector, or none, are dead at once,
# so every run below restarts codes
CONFIGS = {
    # EMA statistics all_reduced, k-means init and restarts broadcast from rank 0
    "ema": dict(num_codes=32, dim=6, use_ema=True, kmeans_init=True, dead_code_threshold=4.0),
    # the same in an l2-normalised 4-d code space behind a (fixed, identically seeded) projection
    "ema_l2_lowdim": dict(num_codes=32, dim=12, code_dim=4, l2_normalize=True, use_ema=True, kmeans_init=True, dead_code_threshold=4.0),
    # gradient codebook with no optimizer: it changes only through k-means init and dead-code restarts
    "grad_restart": dict(num_codes=32, dim=6, kmeans_init=True, dead_code_threshold=4.0),
}


def main(out_dir: Path, sync: bool, steps: int = 8):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(0)  # identical construction on every rank
        vq = VectorQuantizer(**kwargs, sync_distributed=sync).train()
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        centres = torch.randn(6, kwargs["dim"], generator=gen) * 3
        torch.manual_seed(1000 + rank)  # different k-means starts / restart draws on every rank
        batch_means = []
        for _ in range(steps):
            x = centres[torch.randint(6, (2, 40), generator=gen)] + 0.3 * torch.randn(2, 40, kwargs["dim"], generator=gen)
            batch_means.append(x.mean().item())
            vq(x)
        state = {k: v.detach().clone() for k, v in vq.state_dict().items()}
        torch.save({"state": state, "batch_means": batch_means}, out_dir / f"{name}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sync="--no-sync" not in sys.argv[2:])
    # leave without the interpreter's teardown: once in a few dozen runs a process hung there, idle, after main()
    # had written everything and its peer had exited (gloo teardown); the test reads only the files written above
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
