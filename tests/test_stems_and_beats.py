"""audio2video steered by stems, a beat grid and sections, end to end: --control tracks drive the
schedules while the video keeps the mix, --bpm pins the beats, held sounds get no tempo, sections
from a file or found, prompts snapped to beats, bars and sections (printed, in the CSV), every bad
value one line, and a render with control tracks that resumes, or refuses to when a stem changed."""
import csv
import re
import shutil

import numpy as np
import pytest

from cli_checks import DEMO, assert_one_line_error, click_track, decoded_frames, stop_at_frame, write_sound
from music_sounds import SR, detuned_pad, hits, three_parts, write
from sounddiffusion.settings import VideoSettings
from sounddiffusion.video import frame_plan, loop
from sounddiffusion.video.frame_plan import frame_seed, plan_frames

FPS = 8
FAST = [*DEMO, "--fps", str(FPS), "--seed", "5"]
DRUM_FRAMES = [1, 5, 9, 13, 17, 21]  # a hit in the middle of each: every 0.5 s, 120 bpm
KEY_FRAMES = [3, 11, 19]


def middle(frame: int) -> int:
    """The sample in the middle of a video frame at FPS."""
    return round((frame + 0.5) * SR / FPS)


@pytest.fixture(scope="module")
def band(tmp_path_factory):
    """A 3 s mix of a drums stem (hits known to the sample) and a keys stem (low chords elsewhere)."""
    folder = tmp_path_factory.mktemp("band")
    n = 3 * SR
    drums = hits([middle(f) for f in DRUM_FRAMES], n, hz=3000.0)
    keys = hits([middle(f) for f in KEY_FRAMES], n, hz=300.0, level=0.6)
    keys += hits([middle(f) for f in KEY_FRAMES], n, hz=450.0, level=0.4)
    return {"mix": write(folder / "mix.wav", drums + keys), "drums": write(folder / "drums.wav", drums),
            "keys": write(folder / "keys.wav", keys), "folder": folder}


def read_csv(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: np.array([float(row[name]) for row in rows]) for name in rows[0]}


def dry_run(run_tool, out, *args) -> tuple[dict[str, np.ndarray], str]:
    status, stdout, err = run_tool("audio2video", [*args, "--dry_run", "--output", out / "video.mp4", *FAST])
    assert status == 0, err
    return read_csv(out / "video.schedule.csv"), stdout


def test_a_schedule_over_a_stem_follows_the_stem_not_the_mix(run_tool, band, tmp_path):
    table, stdout = dry_run(run_tool, tmp_path, "--path", band["mix"], "--control", f"drums={band['drums']}",
                            "--control", f"keys={band['keys']}", "--strength", "0.2 + 0.6*drums.onset")
    assert len(table["frame"]) == 24  # the mix's length
    np.testing.assert_array_equal(table["strength"], 0.2 + 0.6 * table["drums.onset"])
    assert np.flatnonzero(table["drums.onset"] >= 0.5).tolist() == DRUM_FRAMES
    assert np.flatnonzero(table["keys.onset"] >= 0.5).tolist() == KEY_FRAMES
    onset = table["onset"]  # the mix has onsets there too (peaks) ...
    assert all(onset[f] > 0.3 and onset[f] > onset[f - 1] and onset[f] > onset[f + 1] for f in KEY_FRAMES)
    assert (table["strength"][KEY_FRAMES] < 0.3).all()  # ... which the drums' schedule ignores
    assert (table["strength"][DRUM_FRAMES] >= 0.5).all()
    assert "mix.wav beats: " in stdout and "control track drums beats: " in stdout


def test_bpm_and_beat_offset_put_the_beats_exactly_there(run_tool, band, tmp_path):
    table, stdout = dry_run(run_tool, tmp_path, "--path", band["mix"], "--control", f"drums={band['drums']}",
                            "--bpm", "120", "--beat_offset", "0.25", "--scale", "bpm/20",
                            "--strength", "0.2 + 0.1*drums.beat")
    beats = [2, 6, 10, 14, 18, 22]  # 0.25 s + k * 0.5 s at 8 fps
    for column in ("beat", "drums.beat"):  # the grid is the song's: every track shares it
        assert np.flatnonzero(table[column] == 1).tolist() == beats, column
        np.testing.assert_array_equal(table[column][2:6], [1, 0.75, 0.5, 0.25])
    assert np.flatnonzero(table["bar"] == 1).tolist() == [2, 18]
    np.testing.assert_array_equal(table["beat_in_bar"][beats], [0, 1, 2, 3, 0, 1])
    assert set(table["grid_bpm"]) == {120.0} and set(table["grid_beat_offset"]) == {0.25}
    assert set(table["scale"]) == {6.0}
    assert "the grid of --bpm 120 --beat_offset 0.25" in stdout


def test_a_held_pad_gives_no_tempo_and_says_so(run_tool, tmp_path):
    pad = write(tmp_path / "pad.wav", detuned_pad(3.0))
    table, stdout = dry_run(run_tool, tmp_path, "--path", pad, "--strength", "0.3 + 0.4*beat")
    assert "no steady pulse" in stdout and "--bpm" in stdout
    assert not table["beat"].any() and not table["bar"].any() and not table["grid_bpm"].any()
    assert set(table["strength"]) == {0.3}


def test_the_tracked_tempo_and_first_beat_are_printed_and_pin_the_beats(run_tool, tmp_path):
    clicks = click_track(tmp_path / "clicks.wav", seconds=4.0)  # 120 bpm from 0.25 s
    table, stdout = dry_run(run_tool, tmp_path, "--path", clicks, "--strength", "0.3 + 0.4*beat")
    line = next(line for line in stdout.splitlines() if "beats: " in line)
    bpm, offset = map(float, re.search(r"pin them with --bpm (\S+) --beat_offset (\S+)", line).groups())
    assert bpm == pytest.approx(120, rel=0.005) and offset == pytest.approx(0.25, abs=0.015)
    assert set(table["grid_bpm"]) == {bpm} and set(table["grid_beat_offset"]) == {offset}
    (tmp_path / "pinned").mkdir()
    pinned, _ = dry_run(run_tool, tmp_path / "pinned", "--path", clicks, "--strength", "0.3 + 0.4*beat",
                        "--bpm", str(bpm), "--beat_offset", str(offset))
    assert set(np.flatnonzero(table["beat"] == 1)) <= set(np.flatnonzero(pinned["beat"] == 1))


def test_sections_from_a_file_drive_seed_jumps_and_snap_prompts(run_tool, band, tmp_path):
    sections = tmp_path / "sections.txt"
    sections.write_text("# the song's form\n0:00 intro\n0:01 verse\n0:02.25 chorus\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 dawn\n0:01.2 noon\n0:02.0 dusk\n")
    args = ["--path", band["mix"], "--sections", sections, "--seed_jump", "section_start",
            "--prompt_file", prompts, "--snap_prompts", "section", "--strength", "0.3 + 0.2*section"]
    table, stdout = dry_run(run_tool, tmp_path, *args)
    starts = [0, 8, 18]  # 0, 1, 2.25 s at 8 fps
    assert np.flatnonzero(table["section_start"]).tolist() == starts
    np.testing.assert_array_equal(table["section"], [0] * 8 + [1] * 10 + [2] * 6)
    np.testing.assert_array_equal(table["strength"], 0.3 + 0.2 * table["section"])
    assert "sections: 0:00.00 intro, 0:01.00 verse, 0:02.25 chorus" in stdout
    assert "'noon' asked at 1.200 s, snapped to 1.000 s" in stdout
    assert "'dusk' asked at 2.000 s, snapped to 2.250 s" in stdout
    assert np.flatnonzero(table["prompt_asked"]).tolist() == [0, 9, 16]
    assert np.flatnonzero(table["prompt_snapped"]).tolist() == starts
    plan = plan_frames(VideoSettings(audio=str(band["mix"]), fps=FPS, seed=5, sections=str(sections),
                                     seed_jump="section_start"))
    for first, end in zip(starts, [*starts[1:], 24]):
        assert set(plan.noise_seeds[first:end]) == {frame_seed(5, first)}


def test_sections_are_found_in_a_sound_of_three_parts(tmp_path, monkeypatch):
    from sounddiffusion.control import music_analysis
    from sounddiffusion.sound import analysis
    from sounddiffusion.sound.audio import sound_blocks
    from sounddiffusion.sound.sections import find_sections

    sound = write(tmp_path / "three.wav", three_parts())
    decoded = []
    for module in (analysis, music_analysis):  # the envelopes' decoding, and any other of the analysis
        if hasattr(module, "sound_blocks"):
            monkeypatch.setattr(module, "sound_blocks", lambda *a, **k: decoded.append(a[0]) or sound_blocks(*a, **k))
    plan = plan_frames(VideoSettings(audio=str(sound), fps=FPS, sections="auto", strength="0.3 + 0.1*section"))
    times = [t for t, _ in plan.envelopes.sections]
    assert len(times) == 3 and abs(times[1] - 3) < 0.25 and abs(times[2] - 6) < 0.25, times
    assert sorted(set(plan.values["strength"])) == pytest.approx([0.3, 0.4, 0.5])
    assert len(decoded) == 1  # the sections read the blocks the envelopes decode
    assert list(plan.envelopes.sections) == find_sections(sound_blocks(sound), plan.n_samples)


def test_prompts_snap_to_bars_printed_in_the_csv_and_drawn(run_tool, band, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 dawn\n0:02 dusk\n")
    table, stdout = dry_run(run_tool, tmp_path, "--path", band["mix"], "--bpm", "120", "--beat_offset", "0.25",
                            "--prompt_file", prompts, "--snap_prompts", "bar", "--plot")
    assert "'dawn' asked at 0.000 s, snapped to 0.250 s" in stdout
    assert "'dusk' asked at 2.000 s, snapped to 2.250 s" in stdout
    assert np.flatnonzero(table["prompt_snapped"]).tolist() == [2, 18]
    assert (tmp_path / "video.schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("not a sound")
    return path


BAD = [
    (lambda b, t: ["--strength", "0.3*drum.onset", "--control", f"drums={b['drums']}"],
     ["'drum.onset'", "no control track 'drum'", "drums"]),
    (lambda b, t: ["--strength", "drums.loud", "--control", f"drums={b['drums']}"], ["drums has no 'loud'", "onset"]),
    (lambda b, t: ["--strength", "drums.onset"], ["drums.onset", "--control drums=FILE"]),
    (lambda b, t: ["--control", f"drums={t / 'missing.wav'}"], ["--control drums=", "does not exist"]),
    (lambda b, t: ["--control", f"drums={t / 'notes.wav'}"], ["--control drums=", "not an audio file"]),
    (lambda b, t: ["--control", str(b["drums"])], ["NAME=FILE"]),
    (lambda b, t: ["--control", f"2x={b['drums']}"], ["'2x'", "letters"]),
    (lambda b, t: ["--control", f"d={b['drums']}", "--control", f"d={b['keys']}"], ["twice"]),
    (lambda b, t: ["--bpm", "0"], ["--bpm 0", "above 0"]),
    (lambda b, t: ["--bpm", "-120"], ["--bpm -120"]),
    (lambda b, t: ["--bpm", "fast"], ["--bpm", "fast"]),
    (lambda b, t: ["--beat_offset", "0.5"], ["--beat_offset 0.5", "--bpm"]),
    (lambda b, t: ["--bpm", "120", "--beat_offset", "-1"], ["--beat_offset -1"]),
    (lambda b, t: ["--beats_per_bar", "0"], ["--beats_per_bar 0"]),
    (lambda b, t: ["--sections", "auto:1"], ["--sections auto:1"]),
    (lambda b, t: ["--sections", "auto:²"], ["--sections auto:²", "whole number"]),
    (lambda b, t: ["--sections", "auto:٣"], ["--sections auto:٣", "whole number"]),
    (lambda b, t: ["--sections", t / "missing.txt"], ["sections file", "does not exist"]),
    (lambda b, t: ["--sections", t / "notes.wav"], ["line 1", "TIME label"]),
    (lambda b, t: ["--snap_prompts", "section"], ["--snap_prompts section", "--sections"]),
    (lambda b, t: ["--snap_prompts", "beat"], ["--snap_prompts beat", "--prompt_file"]),
    (lambda b, t: ["--snap_prompts", "bar", "--sections", "auto"], ["--snap_prompts bar", "--prompt_file"]),
    (lambda b, t: ["--seed_jump", "section_start"], ["'section_start'", "--sections"]),
]


@pytest.mark.parametrize("make,words", BAD)
def test_every_bad_value_is_one_line_before_anything_loads(run_tool, band, tmp_path, not_audio, monkeypatch,
                                                           make, words):
    monkeypatch.setattr(frame_plan, "sound_extent", lambda *a: pytest.fail("the sound was decoded"))
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    status, _, err = run_tool("audio2video", ["--path", band["mix"], *make(band, tmp_path), "--outdir", tmp_path,
                                              *FAST])
    assert_one_line_error(status, err, "audio2video", *words)


@pytest.mark.parametrize("make,words", [
    (lambda b: ["--control", f"drums={b['drums']}"], ["--control", "--input_folder", "--path"]),
    (lambda b: ["--bpm", "0"], ["--bpm 0"]), (lambda b: ["--sections", "auto:x"], ["--sections auto:x"])])
def test_a_folder_of_songs_refuses_control_tracks_and_bad_values_at_once(run_tool, band, tmp_path, monkeypatch,
                                                                         make, words):
    from sounddiffusion.jobs import batch_jobs

    monkeypatch.setattr(batch_jobs, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    songs = tmp_path / "songs"
    songs.mkdir()
    write_sound(songs / "a.wav")
    status, _, err = run_tool("audio2video", ["--input_folder", songs, *make(band), "--outdir", tmp_path / "out",
                                              *FAST])
    assert_one_line_error(status, err, "audio2video", *words)


@pytest.mark.slow
def test_a_render_with_control_tracks_resumes_and_refuses_a_changed_stem(run_tool, band, tmp_path, monkeypatch):
    drums = shutil.copy(band["drums"], tmp_path / "drums.wav")
    args = ["--path", band["mix"], "--control", f"drums={drums}", "--strength", "0.3 + 0.5*drums.onset",
            "--seed_jump", "drums.beat == 1", "--bend", "noise=0.4*drums.onset", *FAST]
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "whole.mp4"])
    assert status == 0, err
    real = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real, 9))
    assert run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4"])[0] == 130
    assert run_tool("audio2video", [*args, "--output", tmp_path / "changed.mp4"])[0] == 130
    monkeypatch.setattr(loop, "next_latent", real)
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4", "--resume"])
    assert status == 0, err
    assert np.array_equal(decoded_frames(tmp_path / "whole.mp4"), decoded_frames(tmp_path / "parts.mp4"))
    write(drums, hits([middle(f) for f in (2, 6, 10)], 3 * SR))  # the stem changed since the render began
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "changed.mp4", "--resume"])
    assert_one_line_error(status, err, "audio2video", "cannot resume", "control")
