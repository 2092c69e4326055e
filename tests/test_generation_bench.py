"""The generation benchmark (nbs/08a_generation_bench.ipynb): our cached CFG loop and transformers' generate pick the
same greedy codes, the bandwidth bound is reported, and the span processor forces the image layout."""
import torch

from illume_ref.generation_bench import ImageSpanLogitsProcessor, bench_generate, format_bench_generate
from illume_ref.vocab import VisualVocab

torch.set_num_threads(1)


def test_transformers_generate_parity():
    "Our cached CFG loop and transformers' generate with its own CFG processor pick the same greedy codes."
    rows = bench_generate("toy", batch_size=2, prompt_length=12, methods=("ours", "hf_generate"), hbm_bandwidth=2e10)
    assert [r["method"] for r in rows] == ["ours", "hf_generate"]
    assert all(0 < r["fraction_of_bound"] and r["bound_tokens_per_s"] > 0 for r in rows)
    assert rows[1]["same_codes_as_ours"] is True and all(r["tokens_per_s"] > 0 for r in rows)
    assert "| ours |" in format_bench_generate(rows)
    p = ImageSpanLogitsProcessor(VisualVocab(10, 4), 4)
    s = p(torch.zeros(1, 2), torch.zeros(1, 10 + 4 + 4))      # t=2: after the first row of 2 codes -> <img_row>
    assert s.argmax().item() == VisualVocab(10, 4).row_separator_id


def test_bench_llm_is_the_presets_llm():
    "The benchmark's LLM is built by `model.llama_config_for`, the one way to build an LLMConfig's Llama."
    from illume_ref.config import get_config
    from illume_ref.generation_bench import _bench_llm
    from illume_ref.model import llama_config_for
    cfg = get_config("toy")
    lm, vocab, n = _bench_llm("toy", "cpu", None)
    want = llama_config_for(cfg.llm, vocab.vocab_size)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(lm.config, key) == getattr(want, key), key
    assert lm.get_input_embeddings().weight.shape[0] == vocab.vocab_size and n == cfg.tokenizer.tokens_per_image
