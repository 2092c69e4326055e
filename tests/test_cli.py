import json

import yaml

import pytest


def test_help_lists_subcommands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in ("info", "config", "bench"):
        assert name in out


def test_config_prints_saves_and_reloads(cli, tmp_path):
    code, out, _ = cli("config", "--preset", "full", "--set", "stage1.train.steps=10")
    assert code == 0 and "num_codes: 16384" in out
    assert yaml.safe_load(out)["stage1"]["train"]["steps"] == 10           # not a substring of 'steps: 100000'
    assert yaml.safe_load(out)["stage2"]["train"]["steps"] == 15000
    path = tmp_path / "c.json"
    assert cli("config", "--set", "quantizer.num_codes=64", "--save", path)[0] == 0
    assert json.loads(path.read_text())["quantizer"]["num_codes"] == 64
    code, out, _ = cli("config", "--config", path)
    assert code == 0 and "num_codes: 64" in out


def test_bad_input_is_one_clear_line(cli):
    code, _, err = cli("config", "--set", "encoder.patch_size=7")
    assert code == 2 and "not divisible by patch size 7" in err and "Traceback" not in err
    code, _, err = cli("config", "--preset", "huge")
    assert code == 2 and "unknown preset 'huge'" in err


def test_info_runs_as_installed_console_script(console):
    r = console("info", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["default_device"] == "cpu" and "cpu" in info["available_devices"]


def test_a_partial_config_file_starts_from_its_preset(cli, tmp_path):
    only = tmp_path / "full.yaml"
    only.write_text("preset: full\n")
    code, out, err = cli("config", "--config", only)
    assert code == 0, err
    assert "num_codes: 16384" in out and "hidden_size: 4096" in out          # full's values, not the defaults
    part = tmp_path / "part.yaml"
    part.write_text("quantizer:\n  num_codes: 2048\n")
    code, out, _ = cli("config", "--config", part, "--preset", "small")         # no preset: key -> --preset
    assert code == 0 and "num_codes: 2048" in out and "preset: small" in out and "hidden_size: 896" in out
    code, _, err = cli("config", "--config", only, "--preset", "toy")
    assert code == 2 and "says preset: full, but preset 'toy' was asked for" in err


@pytest.mark.parametrize("override,message", [
    ("world.colors=[red", "cannot parse the value of override 'world.colors=[red'"),
    ("llm.hidden_size=-256", "'llm.hidden_size': must be positive, got -256"),
    ("encoder.patch_size=0", "'encoder.patch_size': must be positive, got 0"),
    ("encoder.num_heads=0", "'encoder.num_heads': must be positive, got 0"),
    ("preset=full", "'preset' cannot be overridden"),
])
def test_bad_overrides_are_one_clear_line(cli, override, message):
    code, _, err = cli("config", "--set", override)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["train", "tokenizer", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["train", "tokenizer", "--eval-images", "-1"], "argument --eval-images: must be at least 0, got -1"),
    (["demo", "--scenes", "lots"], "argument --scenes: expected an integer, got 'lots'"),
    (["demo", "--seed", "-3"], "argument --seed: must be at least 0, got -3"),
])
def test_bad_counts_are_refused_by_argparse(cli, argv, message):
    code, _, err = cli(*argv)
    assert code == 2 and message in err


def test_eval_refuses_overrides_it_cannot_apply(cli, tmp_path):
    out = tmp_path / "ev"
    code, _, err = cli("eval", "--model", tmp_path / "no-model", "--out", out, "--set", "llm.hidden_size=64",
                       "--set", "eval.batch_size=4", "--set", "decoder.guidance_scale=1")
    assert code == 2 and "--set llm.hidden_size=64, decoder.guidance_scale=1: eval cannot apply" in err
    assert "eval.*, world.*, encoder.*" in err and not out.exists()
    code, _, err = cli("eval", "--model", tmp_path / "no-model", "--out", out, "--set", "eval.batch_size=4")
    assert code == 2 and "system.json" in err and not out.exists()      # allowed; fails on the missing model


def test_bench_arguments_are_checked(cli):
    code, _, err = cli("bench", "quantizer", "--arg", "no_such=1")
    assert code == 2 and "benchmark 'quantizer' has no argument 'no_such'" in err
    code, _, err = cli("bench", "quantizer", "--arg", "repeats=[1")
    assert code == 2 and "cannot parse the value of benchmark argument 'repeats=[1'" in err


def test_cli_images_use_core_open_image_on_the_toy_canvas(tmp_path):
    from PIL import Image
    from illume_ref.cli import _images
    from illume_ref.toyworld import BACKGROUND
    import illume_ref.cli as cli_module
    assert not hasattr(cli_module, "open_image") or cli_module.open_image.__module__ == "illume_ref.core"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    im = _images([tmp_path / "clear.png"])[0]
    assert im.mode == "RGB" and im.getpixel((3, 3)) == BACKGROUND
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=r"tiny.png' is 4x4 px"):
        _images([tmp_path / "tiny.png"])


def test_a_failed_command_leaves_no_run_folder(tmp_path):
    from illume_ref.cli import fresh_run_dir
    from illume_ref.training import save_checkpoint
    from torch import nn
    with pytest.raises(RuntimeError):
        with fresh_run_dir(tmp_path / "run") as out:
            (out / "config.yaml").write_text("x: 1\n"); raise RuntimeError("boom")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        with fresh_run_dir(tmp_path / "empty") as out:
            (out / "a.txt").write_text("x"); raise RuntimeError("boom")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())   # as it was
    from illume_ref.cli import _kept_training
    with pytest.raises(RuntimeError):
        with fresh_run_dir(tmp_path / "trained", keep=_kept_training) as out:
            save_checkpoint(out / "checkpoints" / "step-000002", {"m": nn.Linear(1, 1)}, state={"step": 2})
            raise RuntimeError("evaluation failed")
    assert (tmp_path / "trained" / "checkpoints" / "step-000002").is_dir()             # the trained weights stay
