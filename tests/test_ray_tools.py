"""audio2img --ray and audio2video --input_folder [--ray] end to end, on the demo model.

Ray starts once for the module (2 CPUs); the jobs then use that instance with 2 workers. The
pictures and videos are compared byte for byte with single-process runs of the same command.
Tests that need Ray skip when it is not installed (requirements-cluster.txt).
"""
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sounddiffusion.images import read_png_parameters

pytestmark = pytest.mark.slow  # Ray jobs in real processes: python -m pytest -m slow (CI runs them)

REPO = Path(__file__).resolve().parents[1]
FAST = ["--demo", "--H", "64", "--W", "64", "--ddim_steps", "3", "--seed", "5"]
VIDEO = ["--demo", "--H", "64", "--W", "64", "--ddim_steps", "3", "--strength", "0.5", "--seed", "3",
         "--fps", "4"]
RAY = ["--ray", "--ray_workers", "2"]


def synth(path: Path, freq: float, seconds: float = 0.5, sr: int = 22050) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-3 * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def sounds(tmp_path) -> Path:
    folder = tmp_path / "sounds"
    folder.mkdir()
    for i, freq in enumerate((220.0, 330.0, 495.0, 740.0)):
        synth(folder / f"s{i}.wav", freq)
    return folder


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (requirements-cluster.txt)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def wait_for_free_cpus(ray, timeout: float = 20.0) -> None:
    """The job's actors are gone once both CPUs are free again (ray.kill is asynchronous)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"actors left running: {ray.available_resources()}"
        time.sleep(0.1)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def entries(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines() if line]


def test_audio2img_on_ray_same_pictures_resumes_and_remakes_only_deleted(run_tool, ray_local, sounds, tmp_path,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    plain, clustered, later = tmp_path / "plain", tmp_path / "ray", tmp_path / "later"
    common = ["--input_folder", sounds, "--n_samples", "2", "--batch_size", "2", *FAST]
    synth(sounds / "s4.wav", 990.0)
    (sounds / "broken.wav").write_bytes(b"RIFF not really a wave file")
    status, _, err = run_tool("audio2img", [*common, "--outdir", plain])
    assert status == 3, err  # one process, 5 sounds in batches of 2, broken.wav skipped (status 3)
    every_sound = pngs(plain)
    assert len(every_sound) == 5 * 3  # 2 pictures and a grid per sound
    later.mkdir()
    for name in ("s4.wav", "broken.wav"):  # added to the folder at the end (same path, same mtime)
        (sounds / name).rename(later / name)
    expected = {name: data for name, data in every_sound.items() if not name.startswith("s4/")}

    status, out, err = run_tool("audio2img", [*common, "--outdir", clustered, *RAY])
    wait_for_free_cpus(ray_local)
    assert status == 0, err
    assert pngs(clustered) == expected  # same names, pixels and parameters chunks
    assert read_png_parameters(clustered / "s2" / "fft-00001.png")["seed"] == 6
    assert "4 sounds made" in caplog.text and "worker-1@" in caplog.text and "worker-2@" in caplog.text
    made = entries(clustered)
    assert [e["status"] for e in made] == ["finished"] * 4
    assert sorted(p for e in made for p in e["outputs"]) == sorted(expected)
    # Two batches of two sounds: one entry per sound, the batch's time shared by its two sounds.
    assert sorted(Path(e["key"].split(" ")[1]).stem for e in made) == ["s0", "s1", "s2", "s3"]
    assert made[0]["seconds"] == made[1]["seconds"] and made[2]["seconds"] == made[3]["seconds"]
    assert made[0]["worker"] == made[1]["worker"] and made[2]["worker"] == made[3]["worker"]

    # The same command again: nothing to make, nothing written.
    mtimes = {p: p.stat().st_mtime_ns for p in clustered.rglob("*.png")}
    caplog.clear()
    status, out, err = run_tool("audio2img", [*common, "--outdir", clustered, *RAY])
    assert status == 0, err
    assert "0 sounds made" in caplog.text and "4 done before" in caplog.text
    assert len(entries(clustered)) == 4
    assert {p: p.stat().st_mtime_ns for p in clustered.rglob("*.png")} == mtimes

    # One deleted picture: its sound is made again, under the same names, nothing else.
    (clustered / "s1" / "fft-00001.png").unlink()
    caplog.clear()
    status, out, err = run_tool("audio2img", [*common, "--outdir", clustered, *RAY])
    wait_for_free_cpus(ray_local)
    assert status == 0, err
    assert "1 sound made" in caplog.text
    assert [Path(e["key"].split(" ")[1]).name for e in entries(clustered)[4:]] == ["s1.wav"]
    assert pngs(clustered) == expected
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.parent.name != "s1")

    # A sound and an unreadable one added: one batch of the two; the unreadable one is skipped
    # (in the manifest with its reason, reported, exit status 3), the other made, nothing else.
    for name in ("s4.wav", "broken.wav"):
        (later / name).rename(sounds / name)
    mtimes = {p: p.stat().st_mtime_ns for p in clustered.rglob("*.png")}
    caplog.clear()
    status, _, err = run_tool("audio2img", [*common, "--outdir", clustered, *RAY])
    wait_for_free_cpus(ray_local)
    assert status == 3
    assert "1 sound made" in caplog.text and "broken.wav" in caplog.text
    assert "1 of 6 sounds not made" in caplog.text and "1 sound skipped (the input cannot be made" in caplog.text
    broken, added = entries(clustered)[-2:]
    assert broken["key"].split(" ")[1].endswith("broken.wav") and broken["status"] == "skipped"
    assert "broken.wav" in broken["error"] and broken["outputs"] == []
    assert added["key"].split(" ")[1].endswith("s4.wav") and added["status"] == "finished"
    assert sorted(added["outputs"]) == sorted(name for name in every_sound if name.startswith("s4/"))
    assert added["worker"] == broken["worker"]  # the same batch
    assert pngs(clustered) == every_sound
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(entries(clustered)) == 4 + 1 + 2  # one entry per sound and per remake


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Ray's raylet and its workers are children of this process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_processes() -> list[int]:
    """This test session's Ray actor processes that host a batch worker."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::WorkerHost"):
            pids.append(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds Ray's worker processes in /proc")
def test_worker_killed_mid_job_every_sound_made_once(run_tool, ray_local, sounds, tmp_path, monkeypatch):
    """SIGKILL a worker process from outside (as the OOM killer would) once the first sound is
    recorded; Ray restarts it, and the job still makes every sound exactly once."""
    import signal

    from sounddiffusion.jobs import manifest as manifest_module

    killed = []
    real_record = manifest_module.Manifest.record

    def record_then_kill(self, *args, **kwargs):
        entry = real_record(self, *args, **kwargs)
        if not killed:
            pids = worker_processes()
            assert pids, "no Ray worker process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        return entry

    monkeypatch.setattr(manifest_module.Manifest, "record", record_then_kill)
    for i in range(4, 6):
        synth(sounds / f"s{i}.wav", 100.0 * (i + 1))
    outdir = tmp_path / "out"
    status, out, err = run_tool("audio2img", ["--input_folder", sounds, "--outdir", outdir,
                                              "--batch_size", "1", *FAST, *RAY])
    wait_for_free_cpus(ray_local)
    assert killed, "no worker process was killed"
    assert status == 0, err
    made = entries(outdir)
    assert sorted(Path(e["key"].split(" ")[1]).name for e in made) == [f"s{i}.wav" for i in range(6)]
    assert all(e["status"] == "finished" for e in made)
    assert sorted(pngs(outdir)) == [f"s{i}/fft-00000.png" for i in range(6)]


def test_audio2video_folder_equals_single_runs_with_and_without_ray(run_tool, ray_local, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    songs = tmp_path / "songs"
    songs.mkdir()
    synth(songs / "a.wav", 220.0, seconds=1.0)
    synth(songs / "b.wav", 660.0, seconds=0.75)
    single = tmp_path / "single"
    for song in ("a", "b"):
        status, _, err = run_tool("audio2video", ["--path", songs / f"{song}.wav", "--outdir", single, *VIDEO])
        assert status == 0, err
    expected = {name: (single / name).read_bytes() for name in ("a.mp4", "b.mp4")}
    for mode, extra in (("loop", []), ("ray", RAY)):
        outdir = tmp_path / mode
        status, out, err = run_tool("audio2video", ["--input_folder", songs, "--outdir", outdir, *VIDEO, *extra])
        wait_for_free_cpus(ray_local)
        assert status == 0, err
        assert sorted(p.name for p in outdir.iterdir()) == ["a.mp4", "b.mp4", "manifest.jsonl"]
        assert {name: (outdir / name).read_bytes() for name in expected} == expected, mode
        assert sorted(e["outputs"] for e in entries(outdir)) == [["a.mp4"], ["b.mp4"]]
    caplog.clear()
    status, out, _ = run_tool("audio2video", ["--input_folder", songs, "--outdir", tmp_path / "loop", *VIDEO])
    assert status == 0 and "0 songs made" in caplog.text and "2 done before" in caplog.text


def test_audio2video_needs_path_or_folder_not_both(run_tool, tmp_path):
    status, _, err = run_tool("audio2video", ["--outdir", tmp_path, *VIDEO])
    assert status == 2 and "one of the arguments --path/--audio --input_folder is required" in err
    status, _, err = run_tool("audio2video", ["--path", "x.wav", "--input_folder", tmp_path, *VIDEO])
    assert status == 2 and "not allowed with argument" in err
    status, _, err = run_tool("audio2video", ["--input_folder", tmp_path, "--output", tmp_path / "v.mp4", *VIDEO])
    assert status == 2 and "--output" in err and len(err.strip().splitlines()) == 1


def test_ray_workers_without_ray_is_a_one_line_error(run_tool, sounds, tmp_path):
    status, _, err = run_tool("audio2img", ["--input_folder", sounds, "--ray_workers", "2", *FAST])
    assert status == 2 and err.strip() == "audio2img.py: error: --ray_workers 2: give --ray too"


@pytest.mark.parametrize("tool, source", [("audio2img", "--input_folder"), ("audio2video", "--input_folder")])
def test_ray_missing_is_a_one_line_error(run_tool, sounds, tmp_path, monkeypatch, tool, source):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    status, _, err = run_tool(tool, [source, sounds, "--outdir", tmp_path / "out", *FAST[:1], "--ray"])
    assert status == 2
    assert err.strip() == f"{tool}.py: error: Ray is not installed: pip install -r requirements-cluster.txt"


def test_audio2video_folder_defers_a_locked_song_and_a_leftover_render_and_makes_them_next_time(
        run_tool, tmp_path, caplog):
    """Without Ray: a song another process is rendering, and one whose leftover render has other
    settings, are deferred (tried again by the next run); a file that is no sound stays skipped."""
    from sounddiffusion.video.render_state import RenderState

    songs = tmp_path / "songs"
    songs.mkdir()
    for name, freq in (("a", 220.0), ("b", 330.0), ("d", 440.0)):
        synth(songs / f"{name}.wav", freq, seconds=0.5)
    (songs / "c.wav").write_text("not a sound, " * 40)
    outdir = tmp_path / "videos"
    outdir.mkdir()
    busy = RenderState(outdir / "a.mp4")
    busy.create({"format": 1, "fps": "4", "width": 64, "height": 64, "settings": {}})  # holds the lock
    leftover = RenderState(outdir / "b.mp4")
    leftover.create({"format": 1, "fps": "4", "width": 64, "height": 64, "settings": {"seed": 99}})
    leftover.release()
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    args = ["--input_folder", songs, "--outdir", outdir, *VIDEO]
    status, _, err = run_tool("audio2video", args)
    assert status == 3, err
    latest = {Path(e["key"].split(" ")[1]).name: e for e in entries(outdir)}
    assert {name: e["status"] for name, e in latest.items()} == \
        {"a.wav": "deferred", "b.wav": "deferred", "c.wav": "skipped", "d.wav": "finished"}
    assert "another process is rendering" in latest["a.wav"]["error"]
    assert "cannot resume the render" in latest["b.wav"]["error"]
    assert "1 song skipped (the input cannot be made" in caplog.text
    assert "2 songs deferred (tried again on the next run)" in caplog.text
    assert "3 of 4 songs not made" in caplog.text

    busy.release()  # the other process has finished...
    busy.remove()
    leftover.remove()  # ...and the leftover render is deleted, as the message advised
    caplog.clear()
    status, _, err = run_tool("audio2video", args)
    assert status == 3, err  # c.wav still cannot be made
    latest = {Path(e["key"].split(" ")[1]).name: e["status"] for e in entries(outdir)}
    assert latest == {"a.wav": "finished", "b.wav": "finished", "c.wav": "skipped", "d.wav": "finished"}
    assert sorted(p.name for p in outdir.glob("*.mp4")) == ["a.mp4", "b.mp4", "d.mp4"]
    assert "2 songs made" in caplog.text and "1 song skipped" in caplog.text and "deferred (" not in caplog.text
