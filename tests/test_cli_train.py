"""`illume-ref train ...` as a user runs it: fresh run folders, checkpoints, --resume, bad input."""
import json

import pytest
import torch

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
    assert not (tmp_path / "t").exists() and not (tmp_path / "t2").exists()     # failed commands leave no folder


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
    assert code == 2 and "nope" in err and not (tmp_path / "d2").exists()


def _weights(path):
    from illume_ref.core import load_safetensors
    return load_safetensors(path)


def test_steps_are_recorded_and_an_extension_keeps_its_schedule(cli, tmp_path, encoder_dir):
    out = tmp_path / "run"
    args = ["train", "tokenizer", "--set", f"encoder.name_or_path={encoder_dir}", *FAST, "--eval-images", 4]
    assert cli(*args, "--out", out, "--steps", 2)[0] == 0
    saved = get_config(path=out / "config.yaml")
    assert saved.tokenizer.train.steps == 2 and saved.tokenizer.train.schedule_steps is None
    code, _, err = cli("train", "tokenizer", "--out", out, "--resume", "--steps", 3)   # the run's own config
    assert code == 0, err
    assert "keeps its learning-rate schedule (warm-up + cosine over 2 steps)" in err
    saved = get_config(path=out / "config.yaml")
    assert (saved.tokenizer.train.steps, saved.tokenizer.train.schedule_steps) == (3, 2)
    # the extended run's config.yaml, run from scratch, gives the same weights: it describes the run exactly
    code, _, err = cli("train", "tokenizer", "--config", out / "config.yaml", "--out", tmp_path / "again", "--eval-images", 4)
    assert code == 0, err
    a, b = _weights(out / "model.safetensors"), _weights(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config_by_name(cli, tmp_path, encoder_dir):
    out = tmp_path / "run"
    args = ["train", "tokenizer", "--out", out, "--set", f"encoder.name_or_path={encoder_dir}", *FAST, "--eval-images", 2]
    assert cli(*args, "--steps", 2)[0] == 0
    before = (out / "config.yaml").read_text()
    code, _, err = cli(*args, "--resume", "--steps", 3, "--set", "tokenizer.cosine_weight=0.5",
                       "--set", "world.grid_size=4")
    assert code == 2
    assert "tokenizer.cosine_weight: 1.0 in the run, 0.5 now" in err and "world.grid_size: 3 in the run, 4 now" in err
    assert (out / "config.yaml").read_text() == before                  # nothing changed on disk
    code, _, err = cli(*args, "--resume", "--preset", "small")
    assert code == 2 and "preset: 'toy' in the run, 'small' now" in err and "more" in err
    assert json.loads((out / "history.json").read_text())["steps"] == 2


def test_resume_falls_back_to_the_last_intact_checkpoint(cli, tmp_path, encoder_dir):
    out = tmp_path / "run"
    args = ["train", "tokenizer", "--out", out, "--set", f"encoder.name_or_path={encoder_dir}", *FAST, "--eval-images", 2]
    assert cli(*args, "--steps", 4)[0] == 0                               # checkpoints at steps 2 and 4
    weights = out / "checkpoints" / "step-000004" / "tokenizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, stdout, err = cli(*args, "--resume", "--steps", 5)
    assert code == 0, err
    assert "warning: " in err and "resuming from" in err and "step-000002" in err and "step-000004" in err
    assert json.loads(stdout[stdout.index("{"):])["steps"] == 5
    assert [h["step"] for h in json.loads((out / "history.json").read_text())["train"]] == [1, 2, 3, 4, 5]


def test_bad_arguments_fail_before_training_and_leave_no_folder(cli, tmp_path, encoder_dir):
    enc = ["--set", f"encoder.name_or_path={encoder_dir}", *FAST]
    for argv, message in [
        (["train", "tokenizer", *enc, "--eval-images", 0], "--eval-images must be at least 1 for the tokenizer"),
        (["train", "encoder", "--eval-images", 3], "--eval-images applies to the tokenizer and decoder targets"),
        (["train", "decoder", "--kind", "reconstruction"], "--kind applies to the tokenizer target"),
        (["train", "tokenizer", "--tokenizer", tmp_path], "--tokenizer applies to the decoder and the stages"),
        (["train", "tokenizer", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "tokenizer", "--config", tmp_path / "nope.yaml"], "no such config file"),
    ]:
        code, _, err = cli(*argv, "--out", tmp_path / "r", "--steps", 1)
        assert code == 2 and message in err, (argv, err)
        assert not (tmp_path / "r").exists(), argv
    # a failure inside training (the encoder folder is missing) removes the new folder; the next run takes its name
    code, _, err = cli("train", "tokenizer", "--out", tmp_path / "r", "--set", f"encoder.name_or_path={tmp_path}/nope",
                       "--steps", 1, *FAST)
    assert code == 2 and not (tmp_path / "r").exists()
    code, stdout, err = cli("train", "tokenizer", "--out", tmp_path / "r", *enc, "--steps", 1, "--eval-images", 2)
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{"):])["run_dir"] == str(tmp_path / "r")


def test_train_encoder_then_resume(cli, tmp_path):
    "The toy ViT's pretraining keeps checkpoints like every trainer: --resume continues the run, it does not restart."
    out = tmp_path / "enc"
    args = ["train", "encoder", "--out", out, "--set", "encoder.hidden_size=32", "--set", "encoder.num_layers=1",
            "--set", "encoder.num_heads=2"]
    code, stdout, err = cli(*args, "--steps", 2)
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{"):])["steps"] == 2 and (out / "model.safetensors").exists()
    code, stdout, err = cli(*args, "--steps", 3, "--resume")
    assert code == 0, err
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == 3 and [h["step"] for h in history["train"]][-1] == 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
