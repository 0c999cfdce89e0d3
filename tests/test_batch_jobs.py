"""audio2video --input_folder in this process (no Ray): what a dry run leaves behind, and the batch
keys that decide whether a song is made again."""
import json

import pytest

from cli_checks import DEMO, write_sound

VIDEO = [*DEMO, "--fps", "4", "--strength", "0.5", "--seed", "3"]


@pytest.fixture
def songs(tmp_path):
    folder = tmp_path / "songs"
    folder.mkdir()
    for name, seconds in (("a", 0.5), ("b", 0.75)):
        write_sound(folder / f"{name}.wav", seconds=seconds)
    return folder


def no_model(monkeypatch):
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "build_demo_model", lambda: pytest.fail("the dry run loaded the model"))


def test_a_dry_run_writes_schedules_without_the_model_and_the_real_run_then_renders_every_song(
        run_tool, songs, tmp_path, monkeypatch):
    outdir = tmp_path / "out"
    no_model(monkeypatch)
    status, _, err = run_tool("audio2video", ["--input_folder", songs, "--outdir", outdir, "--dry_run", *VIDEO])
    assert status == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["a.schedule.csv", "b.schedule.csv"]  # no manifest
    monkeypatch.undo()
    status, _, err = run_tool("audio2video", ["--input_folder", songs, "--outdir", outdir, *VIDEO])
    assert status == 0, err
    assert sorted(p.name for p in outdir.glob("*.mp4")) == ["a.mp4", "b.mp4"]
    entries = [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["outputs"] for e in entries) == [["a.mp4"], ["b.mp4"]]


def test_a_dry_run_reports_a_song_it_cannot_read_and_exits_3(run_tool, songs, tmp_path, monkeypatch, caplog):
    (songs / "c.wav").write_text("not a sound, " * 40)
    no_model(monkeypatch)
    status, _, err = run_tool("audio2video", ["--input_folder", songs, "--outdir", tmp_path / "out", "--dry_run",
                                              *VIDEO])
    assert status == 3, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.schedule.csv", "b.schedule.csv"]
    assert "c.wav" in caplog.text and "the schedules of 2 of 3 songs" in caplog.text
