"""Tests of illume_ref.quantizer (built in nbs/02_quantizer.ipynb): vector quantization, §3.1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from illume_ref.quantizer import (VectorQuantizer, QuantizerOutput, bench_quantizer, format_bench, kmeans,
                                  nearest_code, perplexity)

ROOT = Path(__file__).resolve().parents[1]


def clustered(n, dim, num_clusters=8, spread=0.2, seed=0):
    "(n, dim) points around `num_clusters` random centres."
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=g) * 3
    return centres[torch.randint(num_clusters, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)


CONFIGS = {
    "plain": dict(num_codes=64, dim=16),
    "ema": dict(num_codes=64, dim=16, use_ema=True),
    "lowdim_l2": dict(num_codes=64, dim=16, code_dim=8, l2_normalize=True),
    "everything": dict(num_codes=64, dim=16, code_dim=4, l2_normalize=True, use_ema=True, kmeans_init=True, dead_code_threshold=1.0),
}


# -- nearest code ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1000, 4096])
def test_chunked_search_equals_brute_force(chunk_size):
    torch.manual_seed(0)
    x, codebook = torch.randn(777, 12), torch.randn(300, 12)
    idx = nearest_code(x, codebook, chunk_size)
    d = torch.cdist(x.double(), codebook.double())  # (M, K) brute force in float64
    ref = d.argmin(1)
    rows = torch.arange(len(x))
    # indices may only differ at (near-)ties: both choices equally far
    assert torch.allclose(d[rows, idx], d[rows, ref], rtol=1e-5, atol=1e-6)
    assert (idx == ref).float().mean() > 0.995


def test_nearest_code_exact_on_separated_codes():
    codebook = torch.eye(5) * 10
    x = codebook[torch.tensor([3, 1, 4, 1, 0, 2])] + 0.1 * torch.randn(6, 5)
    assert nearest_code(x, codebook, chunk_size=2).tolist() == [3, 1, 4, 1, 0, 2]


# -- the module: invariants ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_quantized_equals_lookup_exactly(name):
    torch.manual_seed(0)
    vq = VectorQuantizer(**CONFIGS[name])
    for _ in range(3):  # train a little so that EMA / k-means / restarts have changed the codebook
        vq.train()(clustered(200, 16).reshape(4, 50, 16))
    vq.eval()
    x = torch.randn(3, 7, 16)
    out = vq(x)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (3, 7, 16) and out.indices.shape == (3, 7) and out.indices.dtype == torch.long
    assert torch.equal(out.quantized, vq.lookup(out.indices))
    assert torch.equal(out.indices, vq.encode(x))
    # training mode gives the same values up to the rounding of x + (q - x)
    vq.train()
    vq.dead_code_threshold = 0.0
    assert torch.allclose(vq(x).quantized, out.quantized, atol=1e-5)


def test_other_leading_shapes():
    vq = VectorQuantizer(32, 8).eval()
    for shape in [(10, 8), (2, 3, 4, 8)]:
        out = vq(torch.randn(shape))
        assert out.quantized.shape == shape and out.indices.shape == shape[:-1]


def test_straight_through_gradient_reaches_input():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2, 5, 8)
    (vq(x).quantized * w).sum().backward()
    assert torch.equal(x.grad, w)  # d quantized / dx is the identity


def test_straight_through_through_projection():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 16, code_dim=4, l2_normalize=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    vq(x).quantized.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert vq.in_proj.weight.grad.abs().sum() > 0 and vq.out_proj.weight.grad.abs().sum() > 0


def test_codebook_loss_trains_codes_commitment_trains_input():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8)
    x = torch.randn(4, 8, 8, requires_grad=True)
    out = vq(x)
    out.codebook_loss.backward(retain_graph=True)
    assert x.grad is None
    used = torch.zeros(32, dtype=torch.bool)
    used[out.indices.flatten()] = True
    assert vq.codebook.grad[used].abs().sum(1).gt(0).all()  # every used code gets a gradient
    assert vq.codebook.grad[~used].abs().sum() == 0  # unused codes get none
    vq.codebook.grad = None
    out.commitment_loss.backward()
    assert vq.codebook.grad is None and x.grad.abs().sum() > 0
    assert torch.allclose(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)


def test_ema_moves_codes_to_assigned_means():
    torch.manual_seed(0)
    decay, k = 0.9, 16
    vq = VectorQuantizer(k, 4, use_ema=True, ema_decay=decay)
    assert not vq.codebook.requires_grad
    old = vq.codebook.detach().clone()
    x = clustered(400, 4)
    out = vq(x[None])
    assert out.codebook_loss == 0 and torch.allclose(out.loss, 0.25 * out.commitment_loss)
    idx = out.indices.flatten()
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, 4).index_add_(0, idx, x)
    n = decay * 1.0 + (1 - decay) * counts  # cluster sizes start at 1
    smoothed = (n + 1e-5) / (n.sum() + k * 1e-5) * n.sum()
    expected = (decay * old + (1 - decay) * sums) / smoothed[:, None]
    assert torch.allclose(vq.codebook, expected, atol=1e-5)
    used = counts > 0
    means = sums[used] / counts[used, None]
    assert ((vq.codebook[used] - means).norm(dim=1) < (old[used] - means).norm(dim=1)).all()  # moved toward
    for _ in range(200):
        vq(x[None])
    final = vq.encode(x)
    for c in final.unique():  # after many steps every used code sits at the mean of its cell
        assert torch.allclose(vq.codebook[c], x[final == c].mean(0), atol=1e-3)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2, dead_code_threshold=1.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([-6.0, -6.0]) + 0.1 * torch.randn(16, 2))  # all codes far from data
    x = clustered(256, 2)
    before = vq.codebook.detach().clone()
    assert vq.encode(x).unique().numel() <= 3
    vq(x[None])  # statistics now say most codes are unused ...
    dead = vq.cluster_size < 1.0
    assert dead.sum() >= 10
    vq(x[None])  # ... so this step restarts them from the batch
    assert int(vq.num_restarts) == int(dead.sum())
    revived = vq.codebook.detach()[dead]
    assert (revived[:, None] == x[None]).all(-1).any(1).all()  # each revived code is a batch vector
    assert torch.equal(vq.codebook.detach()[~dead], before[~dead])  # live codes untouched (no optimizer)
    assert vq.encode(x).unique().numel() > 6


def test_restart_raises_usage_in_training():
    def run(threshold):
        torch.manual_seed(0)
        vq = VectorQuantizer(32, 2, dead_code_threshold=threshold)
        with torch.no_grad():
            vq.codebook.copy_(torch.tensor([-6.0, -6.0]) + 0.1 * torch.randn(32, 2))
        opt = torch.optim.SGD(vq.parameters(), lr=0.5)
        for step in range(40):
            out = vq(clustered(256, 2, seed=step)[None])
            opt.zero_grad(); out.loss.backward(); opt.step()
        return out
    without, with_restart = run(0.0), run(1.0)
    assert with_restart.usage > 2 * without.usage
    assert with_restart.perplexity > 2 * without.perplexity
    assert with_restart.commitment_loss < 0.2 * without.commitment_loss


def test_kmeans_init_starts_each_code_at_its_kmeans_count():
    "The first batch is the k-means batch: its EMA update must leave the k-means counts as they are."
    x = torch.cat([torch.ones(300, 4), clustered(212, 4, num_clusters=8)])[None]   # duplicates: empty k-means clusters
    for ema in (False, True):
        torch.manual_seed(0)
        vq = VectorQuantizer(32, 4, kmeans_init=True, use_ema=ema, dead_code_threshold=0.5)
        out = vq(x)
        counts = torch.bincount(out.indices.flatten(), minlength=32).float()
        assert (counts == 0).any() and torch.allclose(vq.cluster_size, counts), (vq.cluster_size, counts)
        vq(x)                                                   # empty k-means clusters are dead: restarted now
        assert int(vq.num_restarts) == int((counts == 0).sum())


def test_restarts_fire_in_a_short_run_where_codes_die():
    "Toy-encoder-like data (60% one vector): codes k-means put on it win nothing and are restarted within steps."
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, use_ema=True, kmeans_init=True, dead_code_threshold=1e-3, ema_decay=0.99)
    for _ in range(30):
        out = vq(torch.cat([torch.ones(1, 300, 8), torch.randn(1, 200, 8, generator=g)], 1))
    assert int(vq.num_restarts) > 10 and out.usage > 0.8


def test_a_restarted_code_has_a_grace_period():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3, kmeans_init=True, dead_code_threshold=1e-3, dead_code_grace=5)
    restarts = []
    for _ in range(20):
        vq(torch.ones(1, 20, 3))                                # one vector: three of the four codes can never win
        restarts.append(int(vq.num_restarts))
    assert restarts == [0] + [3] * 6 + [6] * 6 + [9] * 6 + [12]   # at once, then every grace + 1 steps
    with pytest.raises(ValueError, match="dead_code_grace >= 0"):
        VectorQuantizer(4, 3, dead_code_grace=-1)


def test_kmeans_init_lowers_loss_vs_random():
    x = clustered(1024, 8, num_clusters=16, spread=0.1)[None]
    torch.manual_seed(0)
    rand = VectorQuantizer(32, 8)(x)
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, kmeans_init=True)
    assert not vq.initialized
    km = vq(x)
    assert vq.initialized
    assert km.commitment_loss < 0.1 * rand.commitment_loss
    before = vq.codebook.detach().clone()
    vq(x)
    assert torch.equal(vq.codebook.detach(), before)  # k-means runs once (gradient codebook, no optimizer)


def test_kmeans_function():
    x = clustered(500, 3, num_clusters=5, spread=0.05)
    err = lambda c: (x - c[nearest_code(x, c)]).pow(2).sum(1).mean()
    torch.manual_seed(0)
    centres, counts = kmeans(x, 5, iters=20)
    assert centres.shape == (5, 3) and counts.sum() == 500
    torch.manual_seed(0)
    start = x[torch.randperm(500)[:5]]  # the same random start
    assert err(centres) <= err(start)  # Lloyd iterations never increase the error
    for seed in range(3):  # k-means++ starts find all five well-separated clusters
        torch.manual_seed(seed)
        assert err(kmeans(x, 5, iters=5, init="kmeans++")[0]) < 0.02
    small, _ = kmeans(x[:3], 5, iters=2)  # fewer points than clusters: starts drawn with replacement
    assert small.shape == (5, 3)


def test_low_dim_l2_codes_have_unit_norm():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 32, code_dim=8, l2_normalize=True, use_ema=True, kmeans_init=True, dead_code_threshold=8.0)
    assert vq.in_proj.weight.shape == (8, 32) and vq.out_proj.weight.shape == (32, 8) and vq.codebook.shape == (64, 8)
    x = clustered(400, 32).reshape(8, 50, 32)
    for _ in range(5):
        vq(x)
    assert vq.num_restarts > 0
    ones = torch.ones(64)
    assert torch.allclose(vq.get_codebook().norm(dim=-1), ones, atol=1e-5)
    z = vq.project(x)
    assert torch.allclose(z.norm(dim=-1), torch.ones(8, 50), atol=1e-5)
    vq.eval()
    codes = F.embedding(vq(x).indices, vq.get_codebook())
    assert torch.allclose(codes.norm(dim=-1), torch.ones(8, 50), atol=1e-5)


def test_usage_window_and_perplexity():
    vq = VectorQuantizer(4, 2, usage_window=3)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    near = lambda k: vq.codebook.detach()[k] + 0.01 * torch.randn(1, 20, 2)
    for _ in range(3):
        out = vq(near(0))
    assert out.usage == 0.25 and torch.isclose(out.perplexity, torch.tensor(1.0))
    assert vq(near(1)).usage == 0.5  # window holds code 0 (twice) and code 1
    vq(near(1)); out = vq(near(1))
    assert out.usage == 0.25  # code 0 has left the window
    both = torch.cat([near(2), near(3)], 1)
    assert torch.isclose(vq.eval()(both).perplexity, torch.tensor(2.0))
    assert torch.isclose(perplexity(torch.ones(7)), torch.tensor(7.0))


def test_state_dict_round_trip_resumes_exactly():
    kwargs = CONFIGS["everything"]
    torch.manual_seed(0)
    vq = VectorQuantizer(**kwargs)
    data = [clustered(120, 16, seed=s).reshape(2, 60, 16) for s in range(6)]
    for x in data[:3]:
        vq(x)
    expected_keys = {"codebook", "cluster_size", "embed_sum", "usage_history", "steps", "initialized", "num_restarts"}
    assert expected_keys <= set(vq.state_dict())
    resumed = VectorQuantizer(**kwargs)
    resumed.load_state_dict(vq.state_dict())
    outs = {}
    for name, model in (("original", vq), ("resumed", resumed)):
        torch.manual_seed(123)  # restarts draw random rows: same seed, same draws
        outs[name] = [model(x) for x in data[3:]]
    for a, b in zip(outs["original"], outs["resumed"]):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.loss, b.loss) and torch.equal(a.usage, b.usage)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# -- errors ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    vq = VectorQuantizer(64, 32)
    with pytest.raises(ValueError, match=r"last dimension 32.*\(2, 5, 31\)"):
        vq(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="1 NaN"):
        x = torch.randn(2, 5, 32); x[0, 0, 0] = float("nan"); vq(x)
    with pytest.raises(ValueError, match="2 inf"):
        x = torch.randn(2, 5, 32); x[1, 1, :2] = float("inf"); vq(x)
    with pytest.raises(ValueError, match=r"\[0, 64\); got min 0, max 64"):
        vq.lookup(torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match="min -1, max 3"):
        vq.lookup(torch.tensor([-1, 3]))
    with pytest.raises(TypeError):
        vq.lookup(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError):
        vq(torch.ones(2, 5, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="D=16"):
        nearest_code(torch.randn(4, 16), torch.randn(8, 4))
    with pytest.raises(ValueError):
        VectorQuantizer(0, 8)
    with pytest.raises(ValueError):
        VectorQuantizer(8, 8, ema_decay=1.0)
    assert vq.lookup(torch.zeros(0, dtype=torch.long)).shape == (0, 32)


# -- benchmark (structure and agreement only; nothing is timed here) ------------------------------
def test_bench_structure_tiny():
    rows = bench_quantizer(num_codes=64, num_vectors=300, dims=(4, 16), chunk_size=50, repeats=1)
    assert [r["dim"] for r in rows] == [4, 16]
    for r in rows:
        assert {"chunked_s", "cdist_s", "time_ratio", "chunked_theory_mib", "cdist_theory_mib", "agree"} <= set(r)
        assert r["agree"] > 0.99
        assert (r["chunked_theory_mib"], r["cdist_theory_mib"]) == (50 * 64 * 4 / 2**20, 300 * 64 * 4 / 2**20)  # fp32 blocks
        assert r["chunked_peak_mib"] is None  # only measured on CUDA
    table = format_bench(rows)
    assert "chunked s" in table and "cdist s" in table and len(table.splitlines()) == 5


# -- two processes ---------------------------------------------------------------------------------
def _torchrun(out_dir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_dist_quantizer.py"), str(out_dir), *extra]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_two_processes_agree(tmp_path):
    synced, unsynced = tmp_path / "sync", tmp_path / "nosync"
    synced.mkdir(); unsynced.mkdir()
    _torchrun(synced)
    _torchrun(unsynced, "--no-sync")
    for name in ("ema", "ema_l2_lowdim", "grad_restart"):
        r0, r1 = (torch.load(synced / f"{name}_rank{r}.pt") for r in (0, 1))
        assert r0["batch_means"] != r1["batch_means"]  # the ranks really saw different data
        assert r0["state"]["num_restarts"] > 0  # the restart path ran
        for key in r0["state"]:
            assert torch.equal(r0["state"][key], r1["state"][key]), f"{name}: {key} differs across ranks"
        # control: without synchronisation the same run gives different codebooks
        u0, u1 = (torch.load(unsynced / f"{name}_rank{r}.pt") for r in (0, 1))
        assert not torch.equal(u0["state"]["codebook"], u1["state"]["codebook"]), name
