"""audio2video --input_folder in this process (no Ray): what a dry run leaves behind, and the batch
keys that decide whether a song is made again."""
import json
import os

import pytest

from cli_checks import DEMO, assert_one_line_error, write_sound

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


def batch_keys(monkeypatch, settings) -> list[str]:
    """The manifest keys ``run_audio2video_batch`` gives the songs of ``settings`` (nothing renders)."""
    from sounddiffusion.jobs import batch_jobs
    from sounddiffusion.jobs.outcomes import ClusterSummary
    from sounddiffusion.settings import ModelSettings

    seen = []
    monkeypatch.setattr(batch_jobs, "run_items", lambda items, *a, **k: seen.extend(i.key for i in items)
                        or ClusterSummary(total=len(items)))
    batch_jobs.run_audio2video_batch(settings, ModelSettings(demo=True))
    return seen


@pytest.mark.parametrize("field, first, second", [
    ("prompt_file", "0:00 a red sky\n", "0:00 a green sea\n"),
    ("sections", "0:00 intro\n0:01 verse\n", "0:00 intro\n0:02 verse\n"),
    ("init_img", None, None),
])
def test_a_song_is_keyed_by_the_content_of_the_files_it_reads(songs, tmp_path, monkeypatch, image, field,
                                                             first, second):
    from PIL import Image

    from sounddiffusion.settings import VideoSettings

    path = image if field == "init_img" else tmp_path / "file.txt"
    if first is not None:
        path.write_text(first)
    settings = VideoSettings(input_folder=str(songs), outdir=str(tmp_path / "out"), H=64, W=64,
                             **{field: str(path)})
    keys = batch_keys(monkeypatch, settings)
    assert len(keys) == 2 and batch_keys(monkeypatch, settings) == keys  # the same files: the same keys
    without = batch_keys(monkeypatch, VideoSettings(input_folder=str(songs), outdir=str(tmp_path / "out"), H=64,
                                                    W=64))
    assert set(without).isdisjoint(keys)
    stat = path.stat()
    if field == "init_img":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    else:
        path.write_text(second)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # content alone changed
    assert set(batch_keys(monkeypatch, settings)).isdisjoint(keys)


def test_a_changed_prompt_file_renders_the_folder_again(run_tool, songs, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sounddiffusion")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 a red sky\n")
    (songs / "b.wav").unlink()
    args = ["--input_folder", songs, "--outdir", tmp_path / "out", "--prompt_file", prompts, *VIDEO]
    status, _, err = run_tool("audio2video", args)
    assert status == 0 and "1 song made" in caplog.text, err
    caplog.clear()
    prompts.write_text("0:00 a green sea\n")
    status, _, err = run_tool("audio2video", args)
    assert status == 0 and "1 song made" in caplog.text and "0 done before" in caplog.text, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == ["a-0001.mp4", "a.mp4"]


@pytest.mark.parametrize("flag, words", [("--prompt_file", ["prompt file", "does not exist"]),
                                         ("--init-img", ["init image"])])
def test_a_missing_file_for_every_song_is_one_line_before_the_model_loads(run_tool, songs, tmp_path, monkeypatch,
                                                                          flag, words):
    no_model(monkeypatch)
    status, _, err = run_tool("audio2video", ["--input_folder", songs, "--outdir", tmp_path / "out", flag,
                                              tmp_path / "missing", *VIDEO])
    assert_one_line_error(status, err, "audio2video", *words)
    assert not (tmp_path / "out").exists()


def test_a_job_without_those_files_keeps_the_keys_it_had(songs, tmp_path, monkeypatch):
    """The digest of the settings as it was before the files were recorded by content."""
    from sounddiffusion.jobs.manifest import file_key, settings_digest
    from sounddiffusion.settings import ModelSettings, VideoSettings

    settings = VideoSettings(input_folder=str(songs), outdir=str(tmp_path / "out"), H=64, W=64)
    digest = settings_digest({**settings.parameters(), **ModelSettings(demo=True).parameters(), "lora": []})
    assert batch_keys(monkeypatch, settings) == [file_key(songs / name, settings=digest) for name in ("a.wav", "b.wav")]
