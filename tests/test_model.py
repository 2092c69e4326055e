"""The MLLM (nbs/07_mllm.ipynb): build, save/load round trip, the forward pass and Eq. 1 split by task, images spliced
at their placeholders, AnyRes batches through the forward, cached decoding, left padding, the full preset on `meta`,
and clear errors. Dialogues and collation themselves: tests/test_conversation.py."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from illume_ref.config import ConfigError, get_config
from illume_ref.conversation import pretrained_toy_text_tokenizer
from illume_ref.encoders import images_to_tensor
from illume_ref.model import build_illume, load_illume, meta_illume, save_illume
from illume_ref.tasks import build_dataset
from illume_ref.vocab import IGNORE_INDEX, VisualVocab, extend_tokenizer, load_text_tokenizer

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

TINY = ["llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_layers=2", "llm.adapter_hidden=64",
        "encoder.hidden_size=32", "encoder.num_layers=1", "quantizer.num_codes=64"]


class CodesFromPixels:
    "A deterministic stand-in vision tokenizer: (B, 3, H, W) -> (B, 64) codes in [0, 64)."
    def encode(self, images):
        x = F.adaptive_avg_pool2d(images_to_tensor(images, 64), 8)
        return (x.flatten(2).transpose(1, 2) @ torch.arange(1., 4.)).mul(20).long() % 64


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("illume")
    pretrained_toy_text_tokenizer().save_pretrained(root / "text_tok")
    cfg = get_config("toy", TINY + [f"llm.tokenizer_path={root / 'text_tok'}"])
    model, tok = build_illume(cfg, seed=0)
    data = {t: build_dataset(t, "train", n=2, image_size=64) for t in ("caption", "vqa", "mc", "pope", "edit")}
    return dict(root=root, cfg=cfg, model=model.eval(), tok=tok, vocab=model.visual_vocab, data=data)


def mixed_batch(toy, **kw):
    d = toy["data"]
    pairs = [("caption", d["caption"][0]), ("generate", d["caption"][1]), ("reconstruct", d["caption"][0]),
             ("edit", d["edit"][0]), ("vqa", d["vqa"][0]), ("mc", d["mc"][0]), ("pope", d["pope"][1])]
    return toy["model"].collator(toy["tok"], vision_tokenizer=CodesFromPixels(), **kw)(
        [e for _, e in pairs], tasks=[t for t, _ in pairs])


def forward_args(batch):
    return {k: v for k, v in batch.items() if k != "image_grids"}


def test_build_shapes(toy):
    m, v, tok = toy["model"], toy["vocab"], toy["tok"]
    assert len(tok) == v.vocab_size == m.get_input_embeddings().weight.shape[0] == m.get_output_embeddings().weight.shape[0]
    assert v.num_codes == 64 and m.image_tokens == 64
    assert m.adapter[0].in_features == m.vision_encoder.output_dim and m.adapter[2].out_features == 64


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_are_a_partition(toy, tied):
    "Each parameter in exactly one group: an optimizer refuses a parameter in two groups (the embedding used to be)."
    model = build_illume(toy["cfg"].override({"llm.tie_word_embeddings": True}), seed=1)[0] if tied else toy["model"]
    groups = model.param_groups()
    assert list(groups) == ["adapter", "vision_encoder", "embed", "llm"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))                                   # no parameter twice
    assert set(ids) == {id(p) for p in model.parameters()}             # every parameter once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert len(groups["embed"]) == (1 if tied else 2) and all(p is emb or p is head for p in groups["embed"])
    assert all(p is not emb and p is not head for p in groups["llm"]) and groups["llm"]
    torch.optim.AdamW([{"params": ps, "lr": 1e-3} for ps in groups.values()])   # torch takes them as they are


def test_the_template_travels_from_the_config(toy, tmp_path):
    "`llm.conversation_template` is the model's: its collator lays dialogues out with it, and checkpoints keep it."
    m, tok, ex = toy["model"], toy["tok"], toy["data"]["caption"][0]
    assert m.template == m.config.conversation_template == "vicuna_v1"
    plain, plain_tok = build_illume(toy["cfg"].override({"llm.conversation_template": "plain"}), seed=0)
    assert plain.template == "plain"
    text = plain_tok.decode(plain.collator(plain_tok)([ex], tasks="caption")["input_ids"][0])
    assert "USER" not in text and "A chat between" not in text
    assert "A chat between" in tok.decode(m.collator(tok)([ex], tasks="caption")["input_ids"][0])
    save_illume(tmp_path / "plain", plain, plain_tok)
    assert load_illume(tmp_path / "plain")[0].template == "plain"
    import json                                                       # a checkpoint written before the field: the default
    cfg_file = tmp_path / "plain" / "config.json"
    saved = json.loads(cfg_file.read_text()); del saved["conversation_template"]; cfg_file.write_text(json.dumps(saved))
    assert load_illume(tmp_path / "plain")[0].template == "vicuna_v1"
    with pytest.raises(ConfigError, match=r"'llm.conversation_template': expected one of \('vicuna_v1', 'plain'\), got 'chatml'"):
        build_illume(toy["cfg"].override({"llm.conversation_template": "chatml"}))


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(toy, tmp_path, tied):
    cfg = toy["cfg"].override({"llm.tie_word_embeddings": tied})
    model, tok = build_illume(cfg, seed=1)
    model.eval()
    batch = forward_args(mixed_batch({**toy, "model": model, "tok": tok}))
    with torch.no_grad(): ref = model(**batch).logits
    save_illume(tmp_path / "ckpt", model, tok)
    model2, tok2 = load_illume(tmp_path / "ckpt")
    assert (model2.get_input_embeddings().weight is model2.get_output_embeddings().weight) == tied
    with torch.no_grad(): got = model2.eval()(**batch).logits
    assert torch.equal(ref, got)
    assert tok2.convert_ids_to_tokens(model2.visual_vocab.image_start_id) == "<img_start>"
    with pytest.raises(ValueError, match="expected"):
        load_illume(tmp_path / "ckpt", expected_vocab=VisualVocab(model.visual_vocab.text_vocab_size, 128))
    other = load_text_tokenizer(cfg.llm); extend_tokenizer(other, 32)
    with pytest.raises(ValueError, match="does not fit the tokenizer"):
        load_illume(tmp_path / "ckpt", tokenizer=other)
    with pytest.raises(FileNotFoundError, match="no ILLUME checkpoint"):
        load_illume(tmp_path / "missing")


def test_forward_loss_is_eq1_and_split_by_task(toy):
    m, v = toy["model"], toy["vocab"]
    batch = mixed_batch(toy)
    assert batch["images"].shape == (6, 3, 64, 64)
    labels = batch["labels"]
    assert not (labels == v.image_placeholder_id).any()
    assert int((labels == v.image_start_id).sum()) == 3            # generate, reconstruct, edit
    m.train()
    out = m(**forward_args(batch))
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, manual, atol=1e-5)
    for i, t in enumerate(batch["tasks"]):
        one = F.cross_entropy(out.logits[i, :-1], labels[i, 1:], ignore_index=IGNORE_INDEX)
        assert torch.allclose(out.loss_per_task[t], one, atol=1e-5), t
        assert out.num_targets[t] == int((labels[i, 1:] != IGNORE_INDEX).sum())
    vis = labels[:, 1:] >= v.text_vocab_size
    tgt = labels[:, 1:] != IGNORE_INDEX
    nll = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(vis)
    assert torch.allclose(out.loss_visual, nll[vis & tgt].mean(), atol=1e-5)
    assert torch.allclose(out.loss_text, nll[~vis & tgt].mean(), atol=1e-5)
    out.loss.backward()
    assert m.adapter[0].weight.grad.abs().sum() > 0
    m.zero_grad(); m.eval()


def test_images_are_spliced_at_placeholders(toy):
    m, v = toy["model"], toy["vocab"]
    batch = mixed_batch(toy)
    with torch.no_grad():
        emb = m.embed_inputs(batch["input_ids"], batch["images"])
        feats = m.encode_images(batch["images"]).reshape(-1, emb.shape[-1])
        plain = m.get_input_embeddings()(batch["input_ids"])
    ph = batch["input_ids"] == v.image_placeholder_id
    assert torch.equal(emb[ph], feats)
    assert torch.equal(emb[~ph], plain[~ph])


def test_anyres_collate_and_forward(toy):
    m, v = toy["model"], toy["vocab"]
    exs = [{"image": torch.rand(3, 192, 64), "question": "How many?", "answer": "two"},
           {"image": torch.rand(3, 64, 160), "question": "What shape?", "answer": "square"},
           {"image": torch.rand(3, 4, 4), "question": "Tiny?", "answer": "yes"}]
    batch = m.collator(toy["tok"])(exs, tasks="vqa", anyres={"max_slices": 9, "base": 64})
    assert batch["image_grids"] == [[(3, 1)], [(1, 3)], [(1, 1)]]
    assert batch["images"].shape[0] == 4 + 4 + 2
    assert int((batch["input_ids"] == v.image_placeholder_id).sum()) == 10 * 64
    assert int((batch["input_ids"] == v.row_separator_id).sum()) == 3 + 1 + 1
    assert not (batch["labels"] == v.row_separator_id).any()
    with torch.no_grad(): out = m(**forward_args(batch))
    labels = batch["labels"]
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, manual, atol=1e-5)     # Eq. 1 over the AnyRes batch
    assert out.num_targets["vqa"] == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_cached_decoding_matches_full_forward(toy):
    m, v = toy["model"], toy["vocab"]
    batch = mixed_batch(toy)
    n = int(batch["attention_mask"][3].sum())
    seq, img = batch["input_ids"][3:4, :n], batch["images"][3:4]
    cut = int((seq[0] == v.image_start_id).nonzero()[0]) + 1
    with torch.no_grad():
        full = m(seq, images=img).logits
        out = m(inputs_embeds=m.embed_inputs(seq[:, :cut], img), use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(cut, cut + 6):
            out = m(seq[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, cut - 1:cut + 6], atol=1e-4)
    assert m.visual_logits(full).shape[-1] == 64


def test_left_padding_for_generation(toy):
    batch = mixed_batch(toy, padding_side="left", add_generation_prompt=False)
    am = batch["attention_mask"]
    assert (am[:, -1] == 1).all() and (am.sum(1) < am.shape[1]).any()
    m = toy["model"].eval()
    with torch.no_grad():
        padded = m(input_ids=batch["input_ids"], attention_mask=am, images=batch["images"]).logits
        views = iter(batch["images"])
        for i in range(len(am)):                                    # each row alone, unpadded: the same logits
            ids = batch["input_ids"][i, am[i].bool()][None]
            n_img = int((ids == toy["vocab"].image_placeholder_id).sum()) // m.image_tokens
            imgs = torch.stack([next(views) for _ in range(n_img)]) if n_img else None
            alone = m(input_ids=ids, images=imgs).logits[0]
            assert torch.allclose(alone, padded[i, -ids.shape[1]:], atol=1e-4), i


def test_bad_inputs(toy):
    m, v, tok = toy["model"], toy["vocab"], toy["tok"]
    batch = mixed_batch(toy)
    with pytest.raises(ValueError, match=r"384 <image> placeholder positions .* but 0 image view\(s\)"):
        m(batch["input_ids"])
    with pytest.raises(ValueError, match=r"but 7 image view\(s\) were given \(448 positions expected\)"):
        m(batch["input_ids"], images=torch.cat([batch["images"], batch["images"][:1]]))
    with pytest.raises(ValueError, match=rf"token id {v.vocab_size} is out of range: expected ids in \[0, {v.vocab_size}\)"):
        m(torch.tensor([[1, v.vocab_size]]))
    with pytest.raises(ValueError, match="513 tokens is longer than the context of 512"):
        m(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the context of 30 positions"):
        m.collator(tok, max_length=30)([toy["data"]["vqa"][0]], tasks="vqa")
    with pytest.raises(ValueError, match="got 2 task names for a batch of 7"):
        m(**{**forward_args(batch), "tasks": ["a", "b"]})


def test_hf_llm_and_tower_from_paths(tmp_path, toy):
    "kind='hf' LLM and encoder: loaded from local folders, then the checkpoint reloads without those folders."
    tok = load_text_tokenizer(toy["cfg"].llm)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "tower")
    cfg = get_config("toy", TINY + [f"llm.tokenizer_path={toy['root'] / 'text_tok'}", "llm.kind=hf",
                                    f"llm.name_or_path={tmp_path / 'llm'}", "encoder.kind=hf",
                                    f"encoder.name_or_path={tmp_path / 'tower'}", "encoder.num_layers=2",
                                    "encoder.select_layer=-2"])
    model, tok = build_illume(cfg)
    assert model.language_model.config.hidden_size == 48 and model.vision_encoder.output_dim == 32
    batch = forward_args(mixed_batch({**toy, "model": model.eval(), "tok": tok}))
    with torch.no_grad(): ref = model(**batch).logits
    save_illume(tmp_path / "ckpt", model, tok)
    shutil.rmtree(tmp_path / "llm"); shutil.rmtree(tmp_path / "tower")
    model2, _ = load_illume(tmp_path / "ckpt")
    with torch.no_grad(): assert torch.equal(model2.eval()(**batch).logits, ref)
    bad = cfg.override({"llm.name_or_path": str(tmp_path / "llm_small")})
    small_tok = len(tok) - 100
    LlamaForCausalLM(LlamaConfig(vocab_size=small_tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llm_small")
    with pytest.raises(ValueError, match="do not belong together"):
        build_illume(bad)


def test_full_preset_on_meta():
    full = meta_illume(get_config("full"))
    v = full.visual_vocab
    assert (v.text_vocab_size, v.num_codes, v.vocab_size) == (32000, 16384, 48388)
    assert full.get_input_embeddings().weight.shape == full.get_output_embeddings().weight.shape == (48388, 4096)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert count(full.language_model) == 6_738_415_616 + 2 * 16388 * 4096
    assert 6.8e9 < count(full.language_model) < 6.9e9
    assert full.adapter[0].weight.shape == (4096, 1024) and full.adapter[2].weight.shape == (4096, 4096)
    assert len(full.language_model.model.layers) == 32
    assert full.image_tokens == 256 and v.image_length(256) == 274
    assert full.get_input_embeddings().weight.device.type == "meta"
    small = meta_illume(get_config("small"))
    assert small.visual_vocab.vocab_size == 151936 + 4096 + 4


def _transformers_warnings(fn):
    "Run `fn` with transformers' logging at WARNING; return (fn's result, the messages logged)."
    import logging
    messages = []
    class Keep(logging.Handler):
        def emit(self, record): messages.append(record.getMessage())
    root, level, handler = logging.getLogger("transformers"), hf_logging.get_verbosity(), Keep()
    hf_logging.set_verbosity_warning(); root.addHandler(handler)
    try: out = fn()
    finally: root.removeHandler(handler); hf_logging.set_verbosity(level)
    return out, messages


def test_load_warns_nothing_about_model_type(toy, tmp_path):
    save_illume(tmp_path / "ckpt", toy["model"], toy["tok"])
    (model, tok), messages = _transformers_warnings(lambda: load_illume(tmp_path / "ckpt"))
    assert tok is not None and model.visual_vocab == toy["vocab"]
    assert not [m for m in messages if "You are using a model of type" in m], messages
    from transformers import AutoConfig
    assert type(AutoConfig.from_pretrained(tmp_path / "ckpt")).__name__ == "IllumeConfig"


def test_save_illume_is_atomic(toy, tmp_path, monkeypatch):
    "A failed save leaves no folder (or the old one, untouched); saving into an existing folder still works."
    m, tok = toy["model"], toy["tok"]
    save_illume(tmp_path / "ckpt", m, tok)
    (tmp_path / "ckpt" / "notes.txt").write_text("kept beside the checkpoint")
    save_illume(tmp_path / "ckpt", m, tok)                                  # into an existing folder: works
    assert load_illume(tmp_path / "ckpt")[1] is not None and (tmp_path / "ckpt" / "notes.txt").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    def disk_full(*a, **k): raise OSError("No space left on device")
    monkeypatch.setattr(type(tok), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"): save_illume(tmp_path / "new", m, tok)
    with pytest.raises(OSError, match="No space"): save_illume(tmp_path / "ckpt", m, tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]          # no half folder, no temporary left
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before

def test_collate_drops_examples_longer_than_the_context_and_says_which(toy):
    ex = dict(toy["data"]["caption"][0])
    short, long = {**ex, "caption": "a star"}, {**ex, "caption": "a star " * 10}
    collate = toy["model"].collator(toy["tok"])
    n_long = collate([long], tasks="caption")["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"example 1 \\(caption\\) is {n_long} tokens long"):
        collate([short, long], tasks="caption", max_length=n_long - 1)
    b = collate([long, short, long], tasks="caption", max_length=n_long - 1, too_long="drop")
    assert b["kept"] == [1] and b["input_ids"].shape[0] == 1 and b["images"].shape[0] == 1
    assert torch.equal(b["input_ids"], collate([short], tasks="caption")["input_ids"])
    with pytest.raises(ValueError, match="no example fits"):
        collate([long], tasks="caption", max_length=n_long - 1, too_long="drop")
