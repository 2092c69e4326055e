"""Vocabulary extension (nbs/06_vocab.ipynb): toy text tokenizer, VisualVocab's bijective map and image layout,
tokenizer / model extension and row initialisation, and exact row-wise freezing under AdamW with weight decay."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from illume_ref.config import ConfigError, LLMConfig
from illume_ref.tasks import task_examples
from illume_ref.vocab import (IMAGE_PLACEHOLDER, TextRowFreezer, VisualVocab, extend_model, extend_tokenizer,
                              init_new_rows, load_text_tokenizer, train_toy_text_tokenizer)

hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text"
    corpus = [e["caption"] for e in task_examples("caption", "train", 1000)]
    corpus += [e["question"] + " " + e["answer"] for e in task_examples("vqa", "train", 1000)]
    train_toy_text_tokenizer(1024, corpus).save_pretrained(path)
    return path


def fresh(saved_tokenizer):
    return load_text_tokenizer(LLMConfig(tokenizer_path=str(saved_tokenizer)))


def tiny_llm(vocab_size, tied=False, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied))


def test_toy_tokenizer(saved_tokenizer):
    tok = fresh(saved_tokenizer)
    assert 256 < len(tok) <= 1024
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok("two red circles").input_ids[0] == tok.bos_token_id
    assert len(tok("there are two red circles", add_special_tokens=False).input_ids) == 5   # whole words
    for s in ["unseen: Zebra ✓ 42", "  spaces\nand lines"]:
        assert tok.decode(tok(s, add_special_tokens=False).input_ids) == s
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_tokenizer(LLMConfig(tokenizer_path=str(saved_tokenizer.parent / "nope")))
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        train_toy_text_tokenizer(100, corpus=["a b"])
    with pytest.raises(ValueError, match="empty corpus"):
        train_toy_text_tokenizer(1024, corpus=[])
    with pytest.raises(ConfigError, match="'llm.tokenizer_path' is empty"):   # no path: nothing is trained silently
        load_text_tokenizer(LLMConfig())


def test_visual_vocab_map_and_layout(tmp_path):
    v = VisualVocab(1000, 512)
    assert (v.first_code_id, v.image_start_id, v.image_end_id, v.image_placeholder_id, v.row_separator_id,
            v.vocab_size) == (1000, 1512, 1513, 1514, 1515, 1516)
    assert v.visual_slice == slice(1000, 1512)
    codes = torch.randint(0, 512, (4, 64))
    ids = v.code_to_token_id(codes)
    assert torch.equal(v.token_id_to_code(ids), codes)
    all_ids = torch.arange(1000, 1512)
    assert torch.equal(v.code_to_token_id(v.token_id_to_code(all_ids)), all_ids)
    assert v.is_visual(all_ids).all() and not v.is_visual(torch.tensor([0, 999, 1512, 1515])).any()
    for bad in (torch.tensor([999]), torch.tensor([1512]), 1514):
        with pytest.raises(ValueError, match="not visual tokens"):
            v.token_id_to_code(bad)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        v.code_to_token_id(torch.tensor([512]))
    seq = v.image_token_ids(codes)
    assert seq.shape == (4, 64 + 8 + 2) and v.image_length(64) == 74
    assert (seq[:, 0] == 1512).all() and (seq[:, -1] == 1513).all()
    assert (seq[:, 1:-1].reshape(4, 8, 9)[:, :, -1] == 1515).all()
    assert torch.equal(v.image_codes(seq), codes)
    bad = seq.clone(); bad[0, 9] = 1000
    with pytest.raises(ValueError, match="<img_row>"):
        v.image_codes(bad)
    nosep = VisualVocab(1000, 512, row_separator=False)
    assert nosep.vocab_size == 1515 and nosep.image_token_ids(codes).shape == (4, 66)
    assert torch.equal(nosep.image_codes(nosep.image_token_ids(codes)), codes)
    assert VisualVocab.load(v.save(tmp_path)) == v
    with pytest.raises(ValueError, match="keys"):
        VisualVocab.from_dict({"text_vocab_size": 3})


def test_extend_tokenizer(saved_tokenizer, tmp_path):
    tok = fresh(saved_tokenizer)
    T = len(tok)
    v = extend_tokenizer(tok, 128)
    assert (v.text_vocab_size, v.vocab_size, len(tok)) == (T, T + 132, T + 132)
    ids = tok(f"{IMAGE_PLACEHOLDER}is it red?<img_start><img_0><img_127><img_row><img_end>",
              add_special_tokens=False).input_ids
    assert ids[0] == v.image_placeholder_id
    assert ids[-5:] == [v.image_start_id, T, T + 127, v.row_separator_id, v.image_end_id]
    assert tok.decode(ids[1:-5]) == "is it red?"
    with pytest.raises(ValueError, match="already has"):
        extend_tokenizer(tok, 128)
    tok.save_pretrained(tmp_path)
    v.check_tokenizer(load_text_tokenizer(LLMConfig(tokenizer_path=str(tmp_path))))
    with pytest.raises(ValueError, match="expects"):
        VisualVocab(T, 64).check_tokenizer(tok)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("init", ["mean", "normal"])
def test_extend_model(tied, init):
    m = tiny_llm(100, tied)
    emb0, head0 = m.get_input_embeddings().weight.detach().clone(), m.lm_head.weight.detach().clone()
    v = VisualVocab(100, 16)
    extend_model(m, v, init=init)
    emb_p, head_p = m.get_input_embeddings().weight, m.lm_head.weight
    emb, head = emb_p.detach(), head_p.detach()
    assert emb.shape == head.shape == (120, 32) and m.config.vocab_size == 120
    assert (emb_p is head_p) == tied                                 # tied: one shared Parameter
    if not tied: assert not torch.equal(emb[100:], head[100:])      # untied: each matrix initialised on its own
    assert torch.equal(emb[:100], emb0) and torch.equal(head[:100], head0)
    new = emb[100:]
    assert not torch.equal(new[0], new[1])
    if init == "mean":
        assert (new.mean(0) - emb0.mean(0)).abs().max() < 0.05 * emb0.std(0).max() * 4
        assert new.std(0).mean() < 0.2 * emb0.std(0).mean()
    else:
        assert abs(new.std().item() - 0.02) < 0.006
    assert m(torch.tensor([[1, 105, 119]])).logits.shape == (1, 3, 120)
    with pytest.raises(ValueError, match="new_row_init"):
        extend_model(tiny_llm(100), v, init="zeros")
    with pytest.raises(ValueError, match="do not belong together"):
        extend_model(tiny_llm(50), v)


@pytest.mark.parametrize("tied", [False, True])
def test_text_rows_bit_identical_under_adamw(tied):
    v = VisualVocab(100, 16)
    m = extend_model(tiny_llm(100, tied), v)
    emb, head = m.get_input_embeddings().weight, m.lm_head.weight
    e0, h0 = emb.detach().clone(), head.detach().clone()
    params = [emb] if tied else [emb, head]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    fr = TextRowFreezer(m, v, opt)
    assert fr.tied == tied
    for step in range(6):
        x = torch.cat([torch.randint(0, 100, (3, 5)), v.code_to_token_id(torch.randint(0, 16, (3, 7)))], 1)
        m(x, labels=x).loss.backward()
        assert (emb.grad[:100] == 0).all()
        if not tied: assert (head.grad[:100] == 0).all()
        opt.step(); opt.zero_grad()
    assert torch.equal(emb.detach()[:100], e0[:100]) and torch.equal(head.detach()[:100], h0[:100])
    assert not torch.equal(emb.detach()[100:], e0[100:]) and not torch.equal(head.detach()[100:], h0[100:])
    # the control: the same steps without the freezer move the text rows (so the test can fail)
    fr.remove()
    x = torch.randint(0, 100, (2, 6))
    m(x, labels=x).loss.backward(); opt.step()
    assert not torch.equal(emb.detach()[:100], e0[:100])


def test_weight_decay_alone_moves_text_rows_without_the_restore():
    "Gradient masking alone is not enough: AdamW's decoupled decay shrinks rows whose gradient is zero."
    v = VisualVocab(100, 16)
    m = extend_model(tiny_llm(100), v)
    emb = m.get_input_embeddings().weight
    e0 = emb.detach().clone()
    opt = torch.optim.AdamW([emb], lr=1e-2, weight_decay=0.5)
    TextRowFreezer(m, v)                    # hooks only, no optimizer attached
    x = v.code_to_token_id(torch.randint(0, 16, (2, 6)))
    m(x, labels=x).loss.backward(); opt.step()
    assert not torch.equal(emb.detach()[:100], e0[:100])
    with pytest.raises(ValueError, match="extend_model first"):
        TextRowFreezer(tiny_llm(100), v)


def test_bad_vocab_inputs():
    v = VisualVocab(100, 16)
    ids = v.image_token_ids(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shaped \(L,\) or \(B, L\), got \(1, 2, 22\)"):
        v.image_codes(ids[None])
    with pytest.raises(ValueError, match="needs at least 2 existing rows"):
        init_new_rows(torch.zeros(5, 4), 1)


def test_check_codes_once_then_trust():
    v = VisualVocab(100, 16)
    codes = torch.randint(0, 16, (2, 16))
    assert torch.equal(v.image_token_ids(codes, checked=True), v.image_token_ids(codes))
    assert v.check_codes(torch.tensor([0, 15], dtype=torch.int32)).dtype == torch.long
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\), got values in \[-1, 3\]"):
        v.check_codes(torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="codes must be integers, got dtype torch.bool"):
        v.check_codes(torch.tensor([True]))
    assert v.check_codes(torch.zeros(0, dtype=torch.long)).numel() == 0
