"""Live envelopes (sounddiffusion.live.envelopes): computed as the sound arrives, equal to the file's
analysis frame for frame where they can be, causal smoothing written out, live beat tracking."""
import math

import numpy as np
import pytest

from cli_checks import click_track
from sounddiffusion.live.envelopes import RESCALE_MEMORY_S, CausalSmoother, LiveEnvelopes
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, Smoothing, envelopes
from sounddiffusion.sound.audio import load_audio

CAUSAL = ("rms", "low", "mid", "high", "centroid", "flux", "onset")


def feed(live: LiveEnvelopes, y: np.ndarray, seed: int = 0) -> dict[str, dict[int, float]]:
    """Push ``y`` in random block sizes; the envelopes of every frame a push completed last."""
    rng = np.random.default_rng(seed)
    seen = {name: {} for name in ENVELOPE_NAMES}
    start = 0
    while start < len(y):
        size = int(rng.integers(64, 5000))
        if live.push(y[start:start + size]):
            for name in ENVELOPE_NAMES:
                seen[name][live.frames - 1] = live.values[name]
        start += size
    return seen


@pytest.mark.parametrize("name, fps", [("drums.wav", 12), ("chords.wav", 29.97)])
def test_live_envelopes_are_the_files_frame_for_frame(name, fps):
    path = f"examples/audio/{name}"
    # no rescaling (which needs the whole sound), followers kept: both are causal
    plain = {n: Smoothing(rescale="none", release=0.1 if n in ("flux", "onset") else 0.0) for n in ENVELOPE_NAMES}
    whole = envelopes(path, fps=fps, smoothing=plain)
    live = LiveEnvelopes(fps, smoothing=plain)
    seen = feed(live, load_audio(path))
    assert live.frames == whole.n_frames or live.frames == whole.n_frames - 1  # the last one may be partial
    for envelope in CAUSAL:
        frames = np.array(sorted(seen[envelope]))
        if envelope == "onset":  # the file's onset at t = 0 is capped by the loudest later one: not causal
            frames = frames[frames >= math.ceil(fps)]
        assert len(frames) > 20
        np.testing.assert_array_equal([seen[envelope][i] for i in frames], whole.values[envelope][frames],
                                      err_msg=envelope)


def test_live_beats_land_on_the_files_beats_once_the_tracker_has_heard_two_seconds(tmp_path):
    path = click_track(tmp_path / "clicks.wav", seconds=10, bpm=120)
    whole = envelopes(path, fps=12)
    live = LiveEnvelopes(12)
    beat = {}
    y = load_audio(path)
    for start in range(0, len(y), 1024):  # one sound-card block at a time: every frame is seen
        before = live.frames
        live.push(y[start:start + 1024])
        assert live.frames - before <= 1
        if live.frames > before:
            beat[live.frames - 1] = live.values["beat"]
    assert live.bpm == pytest.approx(120, rel=0.03)
    live_beats = [i for i, value in beat.items() if value == 1.0]
    late = [int(i) for i in whole.beat_frames if i >= 3 * 12]
    assert late and set(late) <= set(live_beats)
    # between beats the envelope falls linearly over one beat (6 frames at 120 bpm, 12 fps)
    first = late[0]
    assert [beat[first + k] for k in range(6)] == pytest.approx([1 - k / 6 for k in range(6)])


def test_silence_has_no_tempo_and_no_beat():
    live = LiveEnvelopes(12)
    live.push(np.zeros(5 * 44100, np.float32))
    assert live.bpm == 0 and live.values["beat"] == 0 and max(live.values.values()) == 0


def test_causal_smoother_follows_the_formulas():
    fps = 10
    # follower: y[i] = y[i-1] + (1 - a)(x[i] - y[i-1]), a = exp(-1 / (release * fps)) while falling
    follower = CausalSmoother(Smoothing(release=0.1, rescale="none"), fps)
    a = math.exp(-1 / (0.1 * fps))
    assert [follower.step(x) for x in (1.0, 0.0, 0.0)] == pytest.approx([1.0, a, a * a])
    # median of this frame and the ones before it (no look-ahead)
    median = CausalSmoother(Smoothing(median=3, rescale="none"), fps)
    assert [median.step(x) for x in (0, 0, 1, 1, 1, 0)] == [0, 0, 0, 1, 1, 1]
    # peak: divided by the loudest so far, which fades with the memory's pole
    peak = CausalSmoother(Smoothing(), fps)
    m = math.exp(-1 / (RESCALE_MEMORY_S * fps))
    assert [peak.step(x) for x in (0.5, 1.0, 0.25)] == pytest.approx([1.0, 1.0, 0.25 / m])
    gate = CausalSmoother(Smoothing(gate=0.3, rescale="none"), fps)
    assert [gate.step(x) for x in (0.2, 0.4)] == [0.0, 0.4]
    minmax = CausalSmoother(Smoothing(rescale="minmax"), fps)
    assert [minmax.step(x) for x in (0.2, 0.6)] == [0.0, 1.0]
    r = 1 - m  # the lowest and highest so far each relax towards the value by r per frame
    low = 0.2 + r * (0.6 - 0.2)
    low, high = min(0.4, low + r * (0.4 - low)), max(0.4, 0.6 - r * (0.6 - 0.4))
    assert minmax.step(0.4) == pytest.approx((0.4 - low) / (high - low))


def test_variables_are_the_frames():
    live = LiveEnvelopes(8)
    live.push(np.zeros(44100, np.float32))
    variables = live.variables(5, 40)
    assert variables["t"] == 5 and variables["s"] == 5 / 8 and variables["fps"] == 8 and variables["max_f"] == 40
    assert set(ENVELOPE_NAMES) <= set(variables) and variables["bpm"] == 0
