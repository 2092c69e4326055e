"""`illume-ref chat | generate | edit | eval` on a saved model folder, as a user runs them."""
import json

import pytest
import torch
from PIL import Image

from illume_ref.config import get_config
from illume_ref.encoders import ToyViT
from illume_ref.generate import IllumeSystem
from illume_ref.model import build_illume
from illume_ref.tokenizer import SemanticVisionTokenizer
from illume_ref.toyworld import render, sample_scene

TINY = ["llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_layers=2", "llm.adapter_hidden=64",
        "encoder.hidden_size=32", "encoder.num_layers=1", "quantizer.num_codes=64", "tokenizer.decoder_hidden=32",
        "tokenizer.decoder_layers=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    "A tiny, untrained system saved as a user would have it (no diffusion decoder: code mosaics)."
    torch.manual_seed(0)
    cfg = get_config("toy", TINY)
    model, tok = build_illume(cfg, seed=0)
    vt = SemanticVisionTokenizer.from_config(cfg, encoder=model.vision_encoder).eval()
    system = IllumeSystem(model.eval(), tok, vt, None, max_new_tokens=4, temperature=1.0, top_k=16)
    root = tmp_path_factory.mktemp("model")
    system.save_pretrained(root / "system")
    ToyViT(cfg.encoder).save_pretrained(root / "encoder")   # the eval's reference feature extractor
    render(sample_scene(3), 64).save(root / "scene.png")
    return root


def test_chat(cli, model_dir):
    code, out, err = cli("chat", "--model", model_dir / "system", "--image", model_dir / "scene.png",
                         "--prompt", "What colour is the circle?", "--max-new-tokens", 3)
    assert code == 0, err
    assert isinstance(out, str) and out.endswith("\n")
    from PIL import Image
    from illume_ref.generate import IllumeSystem
    system = IllumeSystem.from_pretrained(model_dir / "system")          # the library, called directly, agrees
    reply = system.chat([Image.open(model_dir / "scene.png")], "What colour is the circle?", max_new_tokens=3)
    assert out == reply + "\n"


def test_generate_writes_images_deterministically(cli, model_dir, tmp_path):
    args = ["generate", "--model", model_dir / "system", "--prompt", "a red circle", "--prompt", "two blue squares",
            "--num-images", 2, "--seed", 5]
    assert cli(*args, "--out", tmp_path / "a")[0] == 0
    assert cli(*args, "--out", tmp_path / "b")[0] == 0
    records = json.loads((tmp_path / "a" / "images.json").read_text())
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["two blue squares"] * 2
    for r in records:
        a, b = Image.open(tmp_path / "a" / r["file"]), Image.open(tmp_path / "b" / r["file"])
        assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_edit(cli, model_dir, tmp_path):
    code, out, err = cli("edit", "--model", model_dir / "system", "--image", model_dir / "scene.png",
                         "--instruction", "make the circle blue", "--out", tmp_path / "e")
    assert code == 0, err
    assert Image.open(tmp_path / "e" / "edited.png").size == (64, 64)


def test_eval_writes_metrics(cli, model_dir, tmp_path):
    small = ["eval.pope_per_split=2", "eval.mmbench_questions=2", "eval.vqa_questions=2",
             "eval.geneval_prompts_per_category=1", "eval.geneval_images_per_prompt=1", "eval.fid_samples=3",
             "eval.edit_samples=2", f"encoder.name_or_path={model_dir / 'encoder'}"]
    args = ["eval", "--model", model_dir / "system", "--out", tmp_path / "ev"]
    for s in [t for t in TINY if t.startswith("encoder.")] + small: args += ["--set", s]   # eval reads eval/world/encoder only
    code, out, err = cli(*args)
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"pope", "mmbench", "vqa", "geneval", "fid", "edit"} <= set(metrics)
    # the sizes asked for on the command line are the sizes scored (one GenEval prompt per category, one image each)
    assert (metrics["geneval"]["n_prompts"], metrics["geneval"]["n_images"]) == (6, 6)
    assert (metrics["vqa"]["n"], metrics["mmbench"]["n_questions"], metrics["edit"]["n"]) == (2, 2, 2)
    assert metrics["fid"]["n_generated"] == 3 and metrics["headline"]["GenEval overall"] == metrics["geneval"]["overall"]
    assert (tmp_path / "ev" / "report.md").exists()


def test_bad_input(cli, model_dir, tmp_path):
    code, _, err = cli("chat", "--model", tmp_path / "none", "--prompt", "hi")
    assert code == 2 and "system.json" in err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, _, err = cli("edit", "--model", model_dir / "system", "--image", tmp_path / "broken.png",
                       "--instruction", "x", "--out", tmp_path / "e")
    assert code == 2 and "cannot read image" in err and "broken.png" in err
    code, _, err = cli("generate", "--model", model_dir / "system", "--out", tmp_path / "g")
    assert code == 2 and "at least one --prompt" in err
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = cli("generate", "--model", model_dir / "system", "--prompt-file", tmp_path / "empty.txt")
    assert code == 2 and "is empty" in err
    assert not (tmp_path / "e").exists()


def test_sampling_flags_out_of_range_are_refused(cli, model_dir, tmp_path):
    gen = ["generate", "--model", model_dir / "system", "--prompt", "a red circle"]
    for flags, msg in [(["--top-p", 5], "top_p must be None (off) or a number in (0, 1], got 5.0"),
                       (["--top-k", 0], "top_k must be None (off) or an integer >= 1, got 0"),
                       (["--num-images", 0], "num_images must be an integer >= 1, got 0"),
                       (["--temperature", "nan"], "temperature must be a finite number >= 0"),
                       (["--cfg-scale", "-1"], "cfg_scale must be None (no guidance) or a finite number >= 0")]:
        code, _, err = cli(*gen, *flags, "--out", tmp_path / "g")
        assert code == 2 and msg in err, (flags, err)
    chat = ["chat", "--model", model_dir / "system"]
    code, _, err = cli(*chat, "--prompt", "Hi.", "--max-new-tokens", -1)
    assert code == 2 and "max_new_tokens must be an integer >= 1, got -1" in err
    code, _, err = cli(*chat, "--prompt", "   ")
    assert code == 2 and "prompt 0 is empty" in err
    code, _, err = cli("edit", "--model", model_dir / "system", "--image", model_dir / "scene.png",
                       "--instruction", " ", "--out", tmp_path / "e")
    assert code == 2 and "instruction 0 is empty" in err


def test_different_seeds_share_no_image(cli, model_dir, tmp_path):
    "`--seed 0 -n 3` and `--seed 1 -n 3` used to share two images (row r drew with seed + r)."
    pictures = {}
    for seed in (0, 1):
        args = ["generate", "--model", model_dir / "system", "--prompt", "a red circle", "--num-images", 3,
                "--seed", seed, "--out", tmp_path / f"s{seed}"]
        assert cli(*args)[0] == 0
        records = json.loads((tmp_path / f"s{seed}" / "images.json").read_text())
        pictures[seed] = [Image.open(tmp_path / f"s{seed}" / r["file"]).tobytes() for r in records]
    assert len(pictures[0]) == len(pictures[1]) == 3
    assert len(set(pictures[0]) | set(pictures[1])) == 6
