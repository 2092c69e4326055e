"""Stage data (notebook 10): mixtures, toy examples on the train split, the code cache, caption dropout, per-step
batches shared across processes, readers of real data formats and their bad-record handling."""
import json
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from illume_ref.config import get_config
from illume_ref.data import (CodeCache, StageBatches, dialogue, drop_condition, mixture, read_edit_triples,
                             read_llava_conversations, read_pairs, record_source, toy_example)
from illume_ref.model import build_illume
from illume_ref.tokenizer import SemanticVisionTokenizer
from illume_ref.toyworld import scene_split

TINY = ["llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_layers=2", "llm.adapter_hidden=64",
        "encoder.hidden_size=32", "encoder.num_layers=1", "quantizer.num_codes=64"]


@pytest.fixture(scope="module")
def parts():
    cfg = get_config("toy", TINY + ["stage2.train.batch_size=8", "stage3.train.batch_size=8"])
    model, tok = build_illume(cfg, seed=0)
    return cfg, model, tok, SemanticVisionTokenizer.from_config(cfg).eval()


def test_toy_examples_come_from_the_train_split_only():
    rng = random.Random(3)
    for task in ("text", "caption", "reconstruct", "generate", "vqa", "mmbench", "pope", "edit"):
        for _ in range(20):
            ex = toy_example(task, rng)
            for k in ("image", "target"):
                if k in ex: assert scene_split(ex[k]) == "train", (task, k)


def test_two_processes_see_the_halves_of_one_process_batch(parts):
    cfg, model, tok, vt = parts
    data = StageBatches(cfg.stage2, model, tok, vt, world=cfg.world)
    for step in (0, 7):
        whole = data.batch(step)
        halves = [data.batch(step, r, 2) for r in (0, 1)]
        assert halves[0]["tasks"] + halves[1]["tasks"] == whole["tasks"]
        for h, rows in zip(halves, (slice(0, 4), slice(4, 8))):
            assert torch.equal(h["labels"], whole["labels"][rows, :h["labels"].shape[1]])
        assert whole["num_tokens"] == sum(h["num_tokens"] for h in halves)
    assert data.batch(3)["tasks"] != data.batch(4)["tasks"] or not torch.equal(data.batch(3)["input_ids"], data.batch(4)["input_ids"])


def test_mixture_weights_are_what_the_batches_hold(parts):
    cfg, model, tok, vt = parts
    stage = cfg.stage2.replace(data={"caption": 3.0, "vqa": 1.0})
    data = StageBatches(stage, model, tok, vt, world=cfg.world)
    counts = Counter(e["task"] for s in range(100) for e in data.examples(s))
    assert abs(counts["caption"] / 800 - 0.75) < 0.05 and set(counts) == {"caption", "vqa"}


def test_caption_dropout_is_inference_unconditional_row(parts):
    cfg, model, tok, vt = parts
    rng = random.Random(0)
    gen = toy_example("generate", rng)
    assert dialogue(drop_condition(gen, 1.0, rng), codes=torch.zeros(64, dtype=torch.long))[0] == {"role": "user", "content": [""]}
    assert "dropped" not in drop_condition(gen, 0.0, rng)
    stage = cfg.stage2.replace(data={"generate": 1.0}, caption_dropout=0.5)
    data = StageBatches(stage, model, tok, vt, world=cfg.world)
    dropped = sum(bool(e.get("dropped")) for s in range(50) for e in data.examples(s))
    assert 0.4 < dropped / 400 < 0.6


def test_codes_are_computed_once_per_image_and_tokenizer(parts, tmp_path):
    cfg, model, tok, vt = parts
    cache = CodeCache(vt, tmp_path)
    data = StageBatches(cfg.stage2.replace(data={"reconstruct": 1.0}), model, tok, vt, world=cfg.world, code_cache=cache)
    b = data.batch(0)
    assert cache.misses == len(cache) and cache.hits == 8 - len(cache)          # repeats within a batch hit
    assert torch.equal(data.batch(0)["labels"], b["labels"]) and cache.misses == len(cache)
    first = next(iter(cache.table)); cache.save()
    assert torch.equal(CodeCache(vt, tmp_path).table[first], cache.table[first])
    with torch.no_grad(): vt.quantizer.codebook.add_(1.0) if hasattr(vt.quantizer, "codebook") else next(vt.parameters()).add_(1.0)
    assert len(CodeCache(vt, tmp_path)) == 0                                    # another tokenizer: another file


def test_examples_longer_than_the_context_are_dropped_and_counted(parts):
    cfg, model, tok, vt = parts
    data = StageBatches(cfg.stage2.replace(data={"caption": 1.0, "edit": 1.0}), model, tok, vt, world=cfg.world)
    longest = data.batch(0)["input_ids"].shape[1]
    model.config.context_length = longest - 1
    try:
        b = data.batch(0)
        assert b["input_ids"].shape[1] <= longest - 1 and sum(data.counts.values()) >= 1
        assert all(k.startswith("too long/") for k in data.counts)
        assert len(b["tasks"]) == b["input_ids"].shape[0] == 8 - sum(data.counts.values())
    finally:
        model.config.context_length = None


def _images(folder):
    folder.mkdir()
    for n in ("a.png", "b.png"): Image.new("RGB", (16, 16), (10, 200, 10)).save(folder / n)
    return folder


def test_pair_and_edit_readers_name_file_and_line_or_count(tmp_path):
    imgs = _images(tmp_path / "imgs")
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": "a green square"}\n\n'
                                      '{"image": "a.png", "caption": 3}\n[1, 2]\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3: field 'caption' must be non-empty text, got 3"):
        read_pairs(tmp_path / "p.jsonl", imgs)
    ds, rep = read_pairs(tmp_path / "p.jsonl", imgs, on_bad="skip")
    assert len(ds) == rep.kept == 1 and sum(rep.skipped.values()) == 3
    assert [w.split(": ")[0].rsplit(":", 1)[1] for w in rep.where] == ["3", "4", "5"]
    (tmp_path / "bad.jsonl").write_text('{"image": "zzz.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match="holds no usable record"):
        read_pairs(tmp_path / "bad.jsonl", imgs, on_bad="skip")
    (tmp_path / "e.jsonl").write_text('{"source_image": "a.png", "instruction": "make it red", "target_image": "/etc/hosts"}\n')
    with pytest.raises(ValueError, match="outside the image folder"):
        read_edit_triples(tmp_path / "e.jsonl", imgs)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_pairs(tmp_path / "none.jsonl", imgs)
    (tmp_path / "latin.jsonl").write_bytes('{"image": "a.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl' is not UTF-8"):
        read_pairs(tmp_path / "latin.jsonl", imgs)


def test_llava_conversations_become_dialogues(tmp_path, parts):
    cfg, model, tok, vt = parts
    imgs = _images(tmp_path / "imgs")
    recs = [{"id": 0, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "Green."}]},
            {"id": 1, "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]
    (tmp_path / "l.json").write_text(json.dumps(recs, indent=1))
    with pytest.raises(ValueError, match=r"l\.json:\d+: turn 0 must be from human"):
        read_llava_conversations(tmp_path / "l.json", imgs)
    ds, rep = read_llava_conversations(tmp_path / "l.json", imgs, on_bad="skip")
    assert len(ds) == 1 and rep.kept == 1
    stage = cfg.stage3.replace(data={"vqa": 1.0})
    data = StageBatches(stage, model, tok, vt, world=cfg.world, sources={"vqa": record_source(ds, "conversation")})
    b = data.batch(0)
    assert b["images"].shape[0] == 8 and b["tasks"] == ["vqa"] * 8
    text = tok.decode(b["input_ids"][0][b["labels"][0] != -100])
    assert "Green." in text


def test_a_bad_image_stops_the_run_or_is_counted(tmp_path, parts):
    cfg, model, tok, vt = parts
    imgs = _images(tmp_path / "imgs")
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": "a square"}\n')
    ds, _ = read_pairs(tmp_path / "p.jsonl", imgs)
    (imgs / "a.png").write_bytes(b"not a png")                                  # broken after reading the records
    stage = cfg.stage2.replace(data={"caption": 1.0})
    src = {"caption": record_source(ds, "caption")}
    with pytest.raises(ValueError, match=r"p\.jsonl:1: cannot read image"):
        StageBatches(stage, model, tok, vt, world=cfg.world, sources=src).batch(0)
    with pytest.raises(ValueError, match="every example of the batch was skipped"):
        StageBatches(stage, model, tok, vt, world=cfg.world, sources=src, on_bad="skip").batch(0)


def test_mixture_refuses_what_the_stage_does_not_read(parts):
    cfg = parts[0]
    assert set(mixture(cfg.stage1)) == {"caption", "reconstruct"}
    with pytest.raises(ValueError, match="no source gives them"):
        StageBatches(cfg.stage2, parts[1], parts[2], parts[3], sources={"caption": lambda rng: {}})
