import json


def test_help_lists_subcommands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in ("info", "config", "bench"):
        assert name in out


def test_config_prints_saves_and_reloads(cli, tmp_path):
    code, out, _ = cli("config", "--preset", "full", "--set", "stage1.steps=10")
    assert code == 0 and "steps: 10" in out and "num_codes: 16384" in out
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
