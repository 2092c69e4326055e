"""`illume-ref train ...` as a user runs it: fresh run folders, checkpoints, --resume, bad input."""
import json

import pytest

from illume_ref.config import get_config
from illume_ref.encoders import ToyViT

FAST = ["--set", "tokenizer.train.batch_size=4", "--set", "tokenizer.train.save_every=2",
        "--set", "tokenizer.train.log_every=1"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    "A toy ViT saved to a folder (random weights: the CLI path, not the encoder's quality, is under test)."
    path = tmp_path_factory.mktemp("encoder")
    ToyViT(get_config("toy").encoder).save_pretrained(path)
    return path


def test_train_tokenizer_then_resume(cli, tmp_path, encoder_dir):
    out = tmp_path / "tok"
    args = ["train", "tokenizer", "--out", out, "--set", f"encoder.name_or_path={encoder_dir}", *FAST]
    code, stdout, err = cli(*args, "--steps", 2)
    assert code == 0, err
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    result = json.loads(stdout[stdout.index("{"):])
    assert result["steps"] == 2 and 0 < result["eval"]["usage"] <= 1
    # continue the same run to 4 steps: it starts from the step-2 checkpoint, not from scratch
    code, stdout, err = cli(*args, "--steps", 4, "--resume")
    assert code == 0, err
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == 4 and [h["step"] for h in history["train"]] == [1, 2, 3, 4]
    # without --resume the same --out gives a fresh folder; the first run is untouched
    code, stdout, _ = cli(*args, "--steps", 1)
    assert code == 0 and str(tmp_path / "tok-2") in stdout
    assert json.loads((out / "history.json").read_text())["steps"] == 4


def test_train_reconstruction_tokenizer(cli, tmp_path):
    code, stdout, err = cli("train", "tokenizer", "--kind", "reconstruction", "--out", tmp_path / "rec",
                            "--steps", 1, *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "rec" / "config.json").read_text())
    assert "psnr" in json.dumps(json.loads(stdout[stdout.index("{"):])["eval"]).lower()


def test_train_bad_input(cli, tmp_path, encoder_dir):
    code, _, err = cli("train", "tokenizer", "--out", tmp_path / "missing", "--resume")
    assert code == 2 and "needs an existing run folder" in err
    code, _, err = cli("train", "tokenizer", "--out", tmp_path / "t", "--set", "tokenizer.train.lr=-1")
    assert code == 2 and "'tokenizer.train.lr': must be positive" in err
    code, _, err = cli("train", "tokenizer", "--out", tmp_path / "t2", "--set", f"encoder.name_or_path={tmp_path}/nope")
    assert code == 2 and "nope" in err


def test_train_decoder_then_resume(cli, tmp_path, encoder_dir):
    tiny = ["--set", f"encoder.name_or_path={encoder_dir}", "--set", "decoder.block_out_channels=[16, 32]",
            "--set", "decoder.cross_attention_dim=32", "--set", "decoder.attention_head_dim=4",
            "--set", "decoder.train.batch_size=2", "--set", "decoder.train.save_every=1", *FAST]
    assert cli("train", "tokenizer", "--out", tmp_path / "tok", "--steps", 1, "--eval-images", 8, *tiny)[0] == 0
    out = tmp_path / "dec"
    args = ["train", "decoder", "--tokenizer", tmp_path / "tok", "--out", out, "--eval-images", 2, *tiny]
    code, stdout, err = cli(*args, "--steps", 1)
    assert code == 0, err
    code, stdout, err = cli(*args, "--steps", 2, "--resume")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    assert result["steps"] == 2 and 0 <= result["eval"]["object_recall"] <= 1
    assert (out / "pipeline").is_dir()
    sched = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "sample"                         # the toy preset's choice, via the config
    code, _, err = cli("train", "decoder", "--tokenizer", tmp_path / "nope", "--out", tmp_path / "d2", *tiny)
    assert code == 2 and "nope" in err
