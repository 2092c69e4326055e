"""The three training stages (notebook 11): Table 5's groups, frozen text rows and tokenizer, a stage folder that
the CLI's model commands read, the chain, resume, the NaN stop, the full preset's dry run, and 1 vs 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from illume_ref.config import get_config
from illume_ref.core import fingerprint
from illume_ref.data import CodeCache
from illume_ref.generate import IllumeSystem
from illume_ref.model import build_illume
from illume_ref.stages import describe_groups, dry_run, stage_groups, train_stage, train_stages
from illume_ref.tokenizer import SemanticVisionTokenizer

TINY = ["llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_layers=2", "llm.adapter_hidden=64",
        "encoder.hidden_size=32", "encoder.num_layers=1", "quantizer.num_codes=64"]
SHORT = [f"{s}.train.{k}" for s in ("stage1", "stage2", "stage3")
         for k in ("steps=3", "batch_size=4", "log_every=1", "save_every=2", "warmup_steps=1")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = get_config("toy", TINY + SHORT)
    torch.manual_seed(0)
    vt = SemanticVisionTokenizer.from_config(cfg).eval()
    return cfg, vt, tmp_path_factory.mktemp("stages")


def test_each_parameter_sits_in_one_group_and_the_rest_is_frozen(tiny):
    cfg, _, _ = tiny
    model, _ = build_illume(cfg, seed=0)
    for stage, expect in ((cfg.stage1, {"adapter", "visual_embed"}), (cfg.stage2, {"adapter", "llm"}),
                          (cfg.stage3, {"adapter", "llm", "vision_encoder"})):
        groups = stage_groups(model, stage)
        assert set(groups) == expect
        ids = [id(p) for ps in groups.values() for _, p in ps]
        assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    rows = describe_groups(model, cfg.stage1)
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters())


def test_stage1_keeps_text_rows_and_the_tokenizer_bit_identical(tiny):
    cfg, vt, root = tiny
    before_vt = fingerprint(vt)
    system, info = train_stage(cfg, "stage1", root / "s1", tokenizer=vt, progress=False)
    fresh, _ = build_illume(cfg, seed=cfg.seed)
    T = system.model.visual_vocab.text_vocab_size
    emb, emb0 = system.model.get_input_embeddings().weight, fresh.get_input_embeddings().weight
    assert torch.equal(emb[:T], emb0[:T]) and not torch.equal(emb[T:], emb0[T:])
    assert torch.equal(system.model.get_output_embeddings().weight[:T], fresh.get_output_embeddings().weight[:T])
    llm_layer = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(system.model.named_parameters())[llm_layer], dict(fresh.named_parameters())[llm_layer])
    assert fingerprint(vt) == before_vt
    assert info["steps"] == 3 and len(info["history"]) == 3 and "loss/caption" in json.dumps(info["history"])
    saved = json.loads((root / "s1" / "history.json").read_text())
    assert saved["history"][-1]["step"] == 3 and (root / "s1" / "loss.png").exists()


def test_a_stage_folder_is_what_the_model_commands_read(tiny, cli):
    cfg, vt, root = tiny
    if not (root / "s1" / "system.json").exists(): train_stage(cfg, "stage1", root / "s1", tokenizer=vt, progress=False)
    system = IllumeSystem.from_pretrained(root / "s1")
    assert system.vision_tokenizer is not None and fingerprint(system.vision_tokenizer) == fingerprint(vt)
    code, out, err = cli("generate", "--model", root / "s1", "--prompt", "a red circle", "--out", root / "gen")
    assert code == 0, err
    assert (root / "gen" / "0000_0.png").exists()


def test_stages_chain_and_a_finished_chain_is_reused(tiny):
    cfg, vt, root = tiny
    infos = train_stages(cfg, root / "chain", tokenizer=vt, progress=False)
    assert list(infos) == ["stage1", "stage2", "stage3"]
    s2, s3 = (IllumeSystem.from_pretrained(root / "chain" / s).model for s in ("stage2", "stage3"))
    enc = "vision_encoder"
    assert not torch.equal(next(p for n, p in s2.named_parameters() if n.startswith(enc) and p.dim() == 2),
                           next(p for n, p in s3.named_parameters() if n.startswith(enc) and p.dim() == 2))  # stage 3 trains it
    # one code cache serves the chain and is kept: a later stage finds the codes the earlier ones encoded
    (codes,) = (root / "chain").glob("codes-*.safetensors")
    kept = CodeCache(vt, folder=root / "chain")
    assert codes == kept.path and len(kept) == infos["stage3"]["code_cache"]["entries"] > 0
    entries = [infos[s]["code_cache"]["entries"] for s in ("stage1", "stage2", "stage3")]
    assert entries == sorted(entries) and entries[0] > 0          # one table, grown stage by stage
    mtime = (root / "chain" / "stage3" / "history.json").stat().st_mtime
    again = train_stages(cfg, root / "chain", tokenizer=vt, progress=False)
    assert (root / "chain" / "stage3" / "history.json").stat().st_mtime == mtime and again.keys() == infos.keys()


def test_an_interrupted_stage_resumes_to_the_same_weights(tiny):
    cfg, vt, root = tiny
    a, _ = train_stage(cfg, "stage1", root / "straight", tokenizer=vt, progress=False)
    stop = cfg.override(["stage1.train.steps=2", "stage1.train.schedule_steps=3"])
    train_stage(stop, "stage1", root / "cut", tokenizer=vt, progress=False)
    b, _ = train_stage(cfg, "stage1", root / "cut", tokenizer=vt, resume=True, progress=False)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stage2_needs_its_previous_stage(tiny):
    cfg, vt, root = tiny
    with pytest.raises(ValueError, match="starts from the previous stage's folder"):
        train_stage(cfg, "stage2", root / "orphan", tokenizer=vt, progress=False)


def test_a_nan_loss_stops_naming_the_step_and_tasks(tiny):
    cfg, vt, root = tiny
    bad = cfg.override(["stage1.lrs={adapter: 1.0e+30, visual_embed: 1.0e+30}", "stage1.train.grad_clip=0"])
    with pytest.raises(FloatingPointError, match=r"step \d+.*(caption|reconstruct)"):
        train_stage(bad, "stage1", root / "nan", tokenizer=vt, progress=False)


def test_full_preset_dry_run_prints_groups_and_memory():
    text = dry_run(get_config("full"), "stage2")
    assert "meta device" in text and "adapter" in text and "llm" in text
    lines = [l.split() for l in text.splitlines() if len(l.split()) == 7 and l.split()[0].isdigit()]
    assert [int(l[0]) for l in lines] == [8, 32, 256]
    totals = [float(l[-1]) for l in lines]
    assert totals[0] > totals[1] > totals[2]                              # sharding divides the states


def test_cli_dry_run_at_full_builds_nothing(cli, tmp_path):
    code, out, err = cli("train", "stage1", "--preset", "full", "--dry-run", "--out", tmp_path / "x")
    assert code == 0, err
    assert "visual_embed" in out and "16388 of 48388" in out.replace(",", "") and not (tmp_path / "x").exists()
    code, _, err = cli("train", "stage2", "--preset", "toy")
    assert code == 2 and "--from DIR" in err


def _torchrun(script, out, n, encoder):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), script, str(out), str(encoder)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((Path(out) / "losses.json").read_text())


def test_two_processes_give_the_loss_curve_of_one(tmp_path):
    """Stage 1 with a global batch of 8: one process, and two processes with 4 each (gloo, DDP through accelerate),
    see the same examples (StageBatches) and weight their losses by their share of the batch's tokens, so the curves
    agree to float32 rounding: within 1e-6 relative at every step (measured: 7e-8)."""
    from illume_ref.encoders import ToyViT
    cfg = get_config("toy", TINY)
    torch.manual_seed(0)
    ToyViT(cfg.encoder).save_pretrained(tmp_path / "vit")                        # one encoder for both runs
    script = str(Path(__file__).with_name("_dist_stage.py"))
    one, two = (_torchrun(script, tmp_path / name, n, tmp_path / "vit") for name, n in (("one", 1), ("two", 2)))
    assert len(one) == len(two) == 6
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(one, two)), (one, two)
    assert one[-1] < one[0]                                                   # and it learns


def test_gradient_checkpointing_is_a_switch_that_changes_no_number(tiny):
    cfg, vt, root = tiny
    on = cfg.override(["stage1.gradient_checkpointing=true"])
    _, a = train_stage(cfg, "stage1", root / "ckpt-off", tokenizer=vt, progress=False)
    s, b = train_stage(on, "stage1", root / "ckpt-on", tokenizer=vt, progress=False)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-5)
    lm = s.model.language_model
    assert not getattr(lm, "is_activation_checkpointing", None) and not lm.model.gradient_checkpointing   # off again


def test_a_tokenizer_of_another_codebook_is_refused_by_name(tiny):
    cfg, _, root = tiny
    other = SemanticVisionTokenizer.from_config(cfg.override(["quantizer.num_codes=32"]))
    with pytest.raises(ValueError, match=r"32 codes x 64 tokens\) does not match the model \(64 codes"):
        train_stage(cfg, "stage1", root / "mismatch", tokenizer=other, progress=False)


def test_anyres_reaches_the_saved_model_and_inference(tiny):
    from PIL import Image
    from illume_ref.generate import prompt_ids
    cfg, vt, root = tiny
    if not (root / "chain" / "stage2" / "system.json").exists(): train_stages(cfg, root / "chain", tokenizer=vt, progress=False)
    any3 = cfg.override(["stage3.anyres=true", "stage3.base_resolution=64", "stage3.max_slices=2"])
    system, _ = train_stage(any3, "stage3", root / "anyres", previous=root / "chain" / "stage2", tokenizer=vt, progress=False)
    loaded = IllumeSystem.from_pretrained(root / "anyres")
    assert loaded.model.anyres == {"base": 64, "max_slices": 2}
    wide = Image.new("RGB", (128, 64), (245, 245, 245))
    _, views = prompt_ids(loaded.model, loaded.tokenizer, [{"role": "user", "content": [{"image": wide}, "What is here?"]}])
    assert views.shape[0] == 3                                                # the global view and two slices
    assert IllumeSystem.from_pretrained(root / "chain" / "stage2").model.anyres is None


def test_cli_trains_a_stage_into_a_folder_the_model_commands_read(tiny, cli, tmp_path):
    cfg, vt, _ = tiny
    vt.save_pretrained(tmp_path / "tok")
    sets = [a for s in TINY + SHORT for a in ("--set", s)]
    code, out, err = cli("train", "stage1", *sets, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "s1")
    assert code == 0, err
    assert json.loads(out)["stage1"]["steps"] == 3
    code, out, err = cli("chat", "--model", tmp_path / "s1", "--prompt", "Describe a scene.", "--max-new-tokens", "4")
    assert code == 0, err


def test_resuming_a_stage_with_another_model_is_refused_by_name(tiny):
    cfg, vt, root = tiny
    train_stage(cfg.override(["stage1.train.steps=2", "stage1.train.save_every=1"]), "stage1", root / "other",
                tokenizer=vt, progress=False)
    wider = cfg.override(["llm.adapter_hidden=32"])
    with pytest.raises(ValueError, match=r"mllm.safetensors' does not match model 'mllm': shape of 'adapter\."):
        train_stage(wider, "stage1", root / "other", tokenizer=vt, resume=True, progress=False)
