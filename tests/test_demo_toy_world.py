"""`illume-ref demo` as a user runs it, in a subprocess, into run folders. Its one step so far is the toy world
(scenes, oracle, captions, data sets): these tests cover that step and the run folder, not the whole method."""
import json


def test_demo_toy_world_step_writes_a_checked_run_folder(console, tmp_path):
    r = console("demo", "--out", tmp_path / "demo", "--scenes", 6, "--seed", 3)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "demo"
    summary = json.loads((run / "summary.json").read_text())
    world = summary["steps"]["toy_world"]
    assert world["scenes"] == 6 and world["oracle_exact"] == 1.0
    assert set(world["captions_consistent"]) >= {"single_object", "two_object", "counting", "colors",
                                                  "position", "color_attr"}
    assert all(v == 1.0 for v in world["captions_consistent"].values())
    assert world["folder_round_trip_rows"] == 8
    for f in ("config.yaml", "toy_world.png", "oracle.png", "data/caption_val/metadata.jsonl"):
        assert (run / f).stat().st_size > 0, f


def test_demo_never_overwrites_and_checks_its_input(cli, tmp_path):
    out = tmp_path / "demo"
    assert cli("demo", "--out", out, "--scenes", 2)[0] == 0
    first = (out / "summary.json").read_text()
    code, stdout, _ = cli("demo", "--out", out, "--scenes", 2, "--seed", 1)
    assert code == 0 and str(tmp_path / "demo-2") in stdout
    assert (out / "summary.json").read_text() == first
    code, _, err = cli("demo", "--out", tmp_path / "x", "--steps", "toy_world,tokenizr")
    assert code == 2 and "unknown demo step(s) ['tokenizr']" in err
    code, _, err = cli("demo", "--out", tmp_path / "y", "--set", "world.max_objects=20")
    assert code == 2 and "20 objects do not fit in a 3x3 grid" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
