"""live.py's music flags without a model: control tracks played in step with the input and analysed
on their own (sounddiffusion.live.music), the exact grid of --bpm and the live bars of the tracker
(sounddiffusion.live.envelopes), and their mistakes refused before the model loads."""
import logging
import math
import time

import numpy as np
import pytest

from cli_checks import assert_one_line_error, click_track, write_sound
from music_sounds import SR, hits, write
from sounddiffusion.live.controls import live_frame, parse_live_schedules
from sounddiffusion.live.envelopes import LiveEnvelopes, LiveGrid
from sounddiffusion.live.input import Block, SoundInput
from sounddiffusion.live.listener import Listener
from sounddiffusion.live.music import LiveMusic, TrackReader
from sounddiffusion.live.state import LiveState
from sounddiffusion.settings import LiveSettings
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, Smoothing, envelopes
from sounddiffusion.sound.audio import load_audio
from sounddiffusion.sound.beats import BeatGrid, beat_envelopes, grid_beats
from sounddiffusion.sound.control_tracks import ControlTrack, track_envelopes

FPS = 8
SECONDS = 3  # the input: 24 frames of 5512.5 samples
DRUM_FRAMES = [1, 5, 9, 13, 17, 21]  # a drum hit in the middle of each
KEY_FRAMES = [3, 11, 19]
DRUMS_SECONDS = 2.0  # the drums stem is shorter than the input: hits on frames 17 and 21 are cut off


def middle(frame: int) -> int:
    return round((frame + 0.5) * SR / FPS)


@pytest.fixture(scope="module")
def band(tmp_path_factory):
    """The input holds the keys only; the drums stem (2 s of the input's 3) has the drum hits."""
    folder = tmp_path_factory.mktemp("band")
    n = SECONDS * SR
    keys = hits([middle(f) for f in KEY_FRAMES], n, hz=300.0, level=0.6)
    drums = hits([middle(f) for f in DRUM_FRAMES], n, hz=3000.0)[: int(DRUMS_SECONDS * SR)]
    return {"keys": keys, "keys_path": write(folder / "keys.wav", keys),
            "drums": ControlTrack("drums", write(folder / "drums.wav", drums))}


def play(music: LiveMusic, y: np.ndarray, block: int = 1024, start_at: int = 0) -> list[dict]:
    """Push ``y`` (beginning at sample ``start_at`` of the input) block by block; every frame's
    variables (a block is shorter than a frame, so every frame is seen)."""
    frames = []
    for start in range(0, len(y), block):
        if music.push(y[start:start + block], start_at + start):
            frames.append(music.variables(music.main.frames - 1, 0.0))
    return frames


def column(frames: list[dict], name: str) -> np.ndarray:
    return np.array([frame[name] for frame in frames])


def test_a_schedule_over_a_control_track_follows_the_track_not_the_input(band):
    music = LiveMusic(FPS, tracks=[band["drums"]])
    frames = play(music, band["keys"])
    assert len(frames) == SECONDS * FPS
    drums, keys = column(frames, "drums.onset"), column(frames, "onset")
    assert np.flatnonzero(drums >= 0.5).tolist() == [f for f in DRUM_FRAMES if f < DRUMS_SECONDS * FPS]
    assert np.flatnonzero(keys >= 0.5).tolist() == KEY_FRAMES
    settings = LiveSettings(strength="0.2 + 0.6*drums.onset", control=(f"drums={band['drums'].path}",))
    schedules = parse_live_schedules(settings)
    for index, variables in enumerate(frames):
        frame, _ = live_frame(settings, schedules, variables, index, 0)
        assert frame.strength == pytest.approx(0.2 + 0.6 * drums[index])
    every = {f"drums.{name}" for name in (*ENVELOPE_NAMES, "bar", "beat_in_bar", "bpm")}
    assert every <= set(frames[0])


def test_a_control_tracks_envelopes_are_the_files_frame_for_frame(band):
    """With causal smoothing (no rescaling), a track's live envelopes are audio2video's
    track_envelopes over the input's time, after the first second (the file's onset at t = 0)."""
    plain = {n: Smoothing(rescale="none", release=0.1 if n in ("flux", "onset") else 0.0) for n in ENVELOPE_NAMES}
    music = LiveMusic(FPS, smoothing=plain, tracks=[band["drums"]])
    frames = play(music, band["keys"], block=777)
    whole = track_envelopes(band["drums"], fps=FPS, n_samples=len(band["keys"]), smoothing=plain)
    for name in ("rms", "onset", "low", "high", "flux"):
        np.testing.assert_array_equal(column(frames, f"drums.{name}")[FPS:], whole.values[name][FPS:len(frames)],
                                      err_msg=name)


class Played(SoundInput):
    """The samples ``y`` handed on at once in 1024-sample blocks, ``passes`` times (a looping file)."""

    def __init__(self, y: np.ndarray, passes: int):
        super().__init__()
        self.y, self.passes = y, passes

    def start(self) -> None:
        for _ in range(self.passes):
            for start in range(0, len(self.y), 1024):
                self.blocks.put(Block(self.y[start:start + 1024], time.monotonic(), start))
        self.blocks.put(None)

    def stop(self) -> None:
        pass


class EveryFrame(LiveState):
    """A LiveState that keeps every frame it hears."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def hear(self, envelopes, bars, bpm, seconds, tracks):
        super().hear(envelopes, bars, bpm, seconds, tracks)
        self.frames.append(tracks)


def test_a_short_control_track_goes_silent_with_one_warning_and_starts_again_with_a_looping_input(band, caplog):
    state = EveryFrame()
    music = LiveMusic(FPS, tracks=[band["drums"]])
    listener = Listener(Played(band["keys"], passes=2), music, limit=None, max_f=0.0, state=state, recorder=None)
    with caplog.at_level(logging.WARNING, logger="sounddiffusion"), listener.source:
        listener.start()
        while listener.newest(after=-1, timeout=5) is not None and not listener.ended:
            time.sleep(0.01)
        listener.stop()
    music.close()
    onset = np.array([frame["drums"]["onset"] for frame in state.frames])
    rms = np.array([frame["drums"]["rms"] for frame in state.frames])
    n = SECONDS * FPS
    assert len(onset) == 2 * n
    heard = [f for f in DRUM_FRAMES if f < DRUMS_SECONDS * FPS]
    assert np.flatnonzero(onset >= 0.5).tolist() == heard + [n + f for f in heard]  # each pass from the track's start
    end = int(DRUMS_SECONDS * FPS)
    assert not rms[end:n].any() and not rms[n + end:].any()  # silent after its end, on both passes
    warnings = [r.getMessage() for r in caplog.records if "control track drums" in r.getMessage()]
    assert len(warnings) == 1 and "silent" in warnings[0] and "2.00 s" in warnings[0], warnings


def test_a_track_a_few_samples_short_of_the_last_frame_does_not_warn(tmp_path, caplog):
    """As audio2video: a track warns only when a frame of the input lies wholly after its end."""
    # frames of 5512.5 samples: the last of a 2 s input is [82687, 88200); the second track ends before it
    for length, warns in ((2 * SR - 16, False), (82687, True)):
        track = ControlTrack("drums", write(tmp_path / f"{length}.wav", np.full(length, 0.1, np.float32)))
        reader = TrackReader(track, FPS)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sounddiffusion"):
            pieces = [reader.read(start, min(1000, 2 * SR - start)) for start in range(0, 2 * SR, 1000)]  # a 2 s input
        samples = np.concatenate(pieces)
        assert samples[:length].tolist() == pytest.approx([0.1] * length) and not samples[length:].any()
        assert len(caplog.records) == warns, (length, caplog.records)


def test_bpm_and_beat_offset_put_the_beats_exactly_there_live(band):
    fps = 12
    grid = BeatGrid(120.0, 0.25, 4)
    music = LiveMusic(fps, grid=grid, tracks=[band["drums"]])
    frames = []
    rng = np.random.default_rng(3)
    y, start = band["keys"], 0
    while start < len(y):  # blocks of any size, as a sound card's
        size = int(rng.integers(100, 3000))
        if music.push(y[start:start + size], start):
            frames.append(music.variables(music.main.frames - 1, 0.0))
        start += size
    beat, bar, in_bar = (column(frames, name) for name in ("beat", "bar", "beat_in_bar"))
    # beat k at 0.25 + k * 0.5 s lies on the frame holding its sample (frame i starts at sample
    # i * 44100 / 12 = 3675 i); every 4th is a downbeat
    beats = [round((0.25 + 0.5 * k) * SR) for k in range(6)]
    expected = [s // 3675 for s in beats]
    assert expected == [3, 9, 15, 21, 27, 33]
    assert np.flatnonzero(beat == 1).tolist() == expected
    assert np.flatnonzero(bar == 1).tolist() == [expected[0], expected[4]]
    assert in_bar[expected].tolist() == [0, 1, 2, 3, 0, 1] and not in_bar[:3].any()
    assert beat[4:9].tolist() == pytest.approx([1 - k / 6 for k in range(1, 6)])  # falls to 0 over a beat
    assert bar[4:27].tolist() == pytest.approx([1 - k / 24 for k in range(1, 24)])  # ... and over a bar
    assert set(column(frames, "bpm")) == {120.0}
    for name in ("beat", "bar", "beat_in_bar"):  # the song's grid: every track has it
        np.testing.assert_array_equal(column(frames, f"drums.{name}"), column(frames, name))


@pytest.mark.parametrize("fps, grid", [(12, BeatGrid(120.0, 0.25, 4)), (29.97, BeatGrid(97.3, 1.7, 3)),
                                       (24, BeatGrid(480.0, 0.0, 7))])
def test_the_live_grid_is_the_files_frame_for_frame_across_its_chunks(fps, grid):
    """LiveGrid computes 10 s of frames at a time: over 40 s its values are those of the file's
    grid_beats/beat_envelopes over the whole stretch (but the last bar, where a file ends)."""
    live = LiveGrid(grid, fps)
    rate = live.fps
    n = math.ceil(40 * rate)
    starts = np.arange(n + 1, dtype=np.int64) * (SR * rate.denominator) // rate.numerator
    whole = beat_envelopes(grid_beats(grid, starts, SR), n, float(rate))
    keep = n - live.margin
    got = np.array([live.at(i) for i in range(keep)])
    assert keep > 3 * live.chunk
    for k, name in enumerate(("beat", "bar", "beat_in_bar")):
        np.testing.assert_array_equal(got[:, k], whole[name][:keep], err_msg=name)


def test_without_a_grid_the_tracked_beats_are_counted_into_bars(tmp_path):
    fps = 12
    live = LiveEnvelopes(fps, beats_per_bar=4)
    y = load_audio(click_track(tmp_path / "clicks.wav", seconds=10, bpm=120))
    beat, bar, in_bar = [], [], []
    for start in range(0, len(y), 1024):
        if live.push(y[start:start + 1024]):
            beat.append(live.values["beat"])
            bar.append(live.bars["bar"])
            in_bar.append(live.bars["beat_in_bar"])
    beat, bar, in_bar = map(np.array, (beat, bar, in_bar))
    beats = np.flatnonzero(beat == 1)
    assert len(beats) >= 10 and np.diff(beats[1:]).tolist() == [6] * (len(beats) - 2)  # 120 bpm at 12 fps
    numbers = in_bar[beats]
    # counted one by one from the first beat the tracker found (a downbeat, maybe on a frame already past)
    assert numbers.tolist() == [(numbers[0] + k) % 4 for k in range(len(beats))]
    downbeats = beats[numbers == 0]
    assert np.flatnonzero(bar == 1).tolist() == downbeats.tolist()
    # bar falls to 0 over one bar of the tempo: 24 frames
    first = downbeats[1]
    assert bar[first:first + 24].tolist() == pytest.approx([1 - k / 24 for k in range(24)])
    heard = np.flatnonzero(beat)[0]  # the tracker first runs on the frame that holds the 2 s mark
    assert heard >= 2 * fps - 1 and not in_bar[:heard].any() and not bar[:heard].any()
    # whatever the file calls its downbeat, the beats are the file's (beat numbers may start elsewhere)
    whole = envelopes(y, fps=fps)
    assert set(whole.beat_frames[whole.beat_frames >= 3 * fps].tolist()) <= set(beats.tolist())


@pytest.fixture
def no_model(monkeypatch):
    """live.py with the model loader replaced by a failure: a test passes only if the mistake is
    reported before the model would load."""
    import sounddiffusion.live.loop as live_loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(live_loop, "load_engine", refuse)


def test_music_mistakes_fail_before_the_model_loads(run_tool, band, tmp_path, no_model):
    sound = write_sound(tmp_path / "tone.wav")
    drums = f"drums={band['drums'].path}"
    base = ["--demo", "--input", sound, "--port", "0"]
    cases = [(["--strength", "0.3*drum.onset", "--control", drums], ("'drum.onset'", "no control track 'drum'")),
             (["--strength", "drums.onset"], ("drums.onset", "--control drums=FILE")),
             (["--control", f"drums={tmp_path / 'missing.wav'}"], ("--control drums=", "does not exist")),
             (["--control", str(band["drums"].path)], ("NAME=FILE",)),
             (["--control", drums, "--control", drums], ("twice",)),
             (["--bpm", "0"], ("--bpm 0", "above 0")),
             (["--bpm", "fast"], ("--bpm", "fast")),
             (["--beat_offset", "0.5"], ("--beat_offset 0.5", "--bpm")),
             (["--bpm", "120", "--beats_per_bar", "0"], ("--beats_per_bar 0",)),
             (["--sections", "auto"], ("unrecognized", "--sections")),
             (["--strength", "0.3 + 0.1*section"], ("'section'", "live.py does not take"))]
    for extra, words in cases:
        assert_one_line_error(*run_tool("live", [*base, *extra])[::2], "live", *words)
