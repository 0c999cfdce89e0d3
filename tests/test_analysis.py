"""Envelopes at the video frame rate: against librosa called independently, exact RMS, streaming,
clicks, silence, band edges and the smoothing chain."""
import math
import tracemalloc

import librosa
import numpy as np
import pytest
import soundfile

from sounddiffusion.errors import ParameterError
from sounddiffusion.sound.analysis import (DEFAULT_SMOOTHING, ENVELOPE_NAMES, GRID_NAMES, Smoothing, envelopes,
                                           parse_smoothing, smooth, snap_to_beats)
from sounddiffusion.sound.audio import (SAMPLE_RATE, frame_bounds, frame_count, frame_starts, load_audio,
                                        slice_rms)

SR = SAMPLE_RATE
RAW = {name: Smoothing(rescale="none") for name in ENVELOPE_NAMES}


@pytest.fixture(scope="module")
def organ(audio_dir):
    return audio_dir / "JK_Organ2_120-F.wav"


@pytest.fixture(scope="module")
def voice(audio_dir):
    return audio_dir / "Toms_diner.wav"


def frame_of_time(seconds: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """The video frame holding each time, written independently of the module."""
    return np.minimum(np.floor(np.asarray(seconds) * fps + 1e-9).astype(int), n_frames - 1)


def assert_in_unit_range(env):
    for name in ENVELOPE_NAMES:
        values = env.values[name]
        assert values.shape == (env.n_frames,) and values.dtype == np.float64, name
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["JK_Organ2_120-F.wav", "Toms_diner.wav"])
def test_onset_lines_up_with_librosa_called_on_the_whole_file(audio_dir, name):
    fps = 12
    y = load_audio(audio_dir / name)
    env = envelopes(audio_dir / name, fps=fps, smoothing={"onset": Smoothing()})
    reference = librosa.onset.onset_strength(y=y, sr=SR)
    hop_frames = frame_of_time(librosa.frames_to_time(np.arange(len(reference)), sr=SR), fps, env.n_frames)
    per_frame = np.zeros(env.n_frames)
    np.maximum.at(per_frame, hop_frames, reference)
    assert np.corrcoef(per_frame, env.values["onset"])[0, 1] > 0.9
    onset = np.pad(env.values["onset"], 1)
    local_peaks = set(np.flatnonzero((onset[1:-1] >= onset[:-2]) & (onset[1:-1] >= onset[2:])))
    hops = librosa.onset.onset_detect(y=y, sr=SR, onset_envelope=reference)
    strong = hops[reference[hops] >= 0.3 * reference.max()]  # weak onsets on a slope make no peak
    detected = frame_of_time(librosa.frames_to_time(strong, sr=SR), fps, env.n_frames)
    assert len(detected) >= 3
    for frame in detected:
        assert local_peaks & {frame - 1, frame, frame + 1}, (frame, sorted(local_peaks))


@pytest.mark.parametrize("name", ["JK_Organ2_120-F.wav", "Toms_diner.wav"])
def test_beats_and_bpm_equal_librosa_beat_track(audio_dir, name):
    fps = 12
    y = load_audio(audio_dir / name)
    env = envelopes(audio_dir / name, fps=fps)
    tempo, beats = librosa.beat.beat_track(y=y, sr=SR)
    expected = np.unique(frame_of_time(librosa.frames_to_time(beats, sr=SR), fps, env.n_frames))
    assert len(env.beat_frames) == len(expected) > 3
    assert np.abs(env.beat_frames - expected).max() <= 1
    assert env.bpm == pytest.approx(float(np.atleast_1d(tempo)[0]), rel=0.01)
    beat = env.values["beat"]
    np.testing.assert_array_equal(beat[env.beat_frames], 1.0)
    assert (beat[: env.beat_frames[0]] == 0).all()
    between = beat[env.beat_frames[0]: env.beat_frames[1]]
    assert (np.diff(between) < 0).all() and between[-1] > 0


@pytest.mark.parametrize("fps,first", [(24, 0), (29.97, 0), (7.5, 13), (30000 / 1001, 1000)])
def test_frame_starts_are_the_frames_first_samples_and_the_last_ones_end(fps, first):
    starts = frame_starts(40, fps, SR, first=first)
    assert starts.dtype == np.int64 and starts.shape == (41,)
    bounds = [frame_bounds(first + k, fps, SR) for k in range(40)]
    assert starts.tolist() == [lo for lo, _ in bounds] + [bounds[-1][1]]
    exact = {24: (24, 1), 29.97: (2997, 100), 7.5: (15, 2), 30000 / 1001: (30000, 1001)}[fps]
    assert starts[5] == (first + 5) * SR * exact[1] // exact[0]  # floor(k sr / fps), fps as an exact fraction


def test_rms_of_known_signals_is_their_hand_computed_level():
    """Five frames at 12 fps (3,675 samples each) whose RMS is known without computing it:
    silence 0; a square wave of +-0.5 is 0.5; a sine of amplitude 0.8 over 25 whole periods
    (300 Hz, 147 samples a period) is 0.8/sqrt(2); 0.6 on a third of the samples and 0 on the
    rest is 0.6/sqrt(3); a full-scale square wave is 1 (the level's definition)."""
    n = SR // 12
    t = np.arange(n)
    square = np.where((t // 49) % 2 == 0, 1.0, -1.0)
    third = np.where(t < n // 3, 0.6, 0.0)
    samples = np.concatenate([np.zeros(n), 0.5 * square, 0.8 * np.sin(2 * np.pi * 300 * t / SR), third, square])
    env = envelopes(samples.astype(np.float32), fps=12)
    want = [0.0, 0.5, 0.8 / math.sqrt(2), 0.6 / math.sqrt(3), 1.0]
    np.testing.assert_allclose(env.values["rms"], want, rtol=1e-6, atol=1e-12)
    assert slice_rms(np.float32([3.0, -4.0])) == math.sqrt(12.5) and slice_rms(np.float32([])) == 0.0


def test_rms_of_a_recording_follows_its_formula_on_the_video_frames(organ):
    """rms[i] = sqrt(mean(y[start_i:end_i]^2)), start_i = floor(i * 44100 / fps), the last frame
    padded with zeros: written out here in exact fractions and float64 sums."""
    from fractions import Fraction

    y = load_audio(organ).astype(np.float64)
    for fps in (Fraction(12), Fraction(2997, 100)):  # 29.97 is read as 2997/100 exactly
        env = envelopes(organ, fps=float(fps))
        bounds = [math.floor(i * SR / fps) for i in range(env.n_frames + 1)]
        want = []
        for start, end in zip(bounds, bounds[1:]):
            piece = y[start:end]
            want.append(math.sqrt(math.fsum(piece * piece) / (end - start)))  # zeros past the end add nothing
        np.testing.assert_allclose(env.values["rms"], want, rtol=1e-9, atol=0)
        assert DEFAULT_SMOOTHING["rms"] == Smoothing(median=1, attack=0, release=0, gate=0, rescale="none")


@pytest.mark.parametrize("name", ["Toms_diner.wav", "synth_chords_short.wav"])  # 44.1 kHz; 48 kHz stereo
def test_streaming_a_file_equals_analysing_the_loaded_samples(audio_dir, name):
    from_file = envelopes(audio_dir / name, fps=24)
    from_array = envelopes(load_audio(audio_dir / name), fps=24)
    assert from_file.n_frames == from_array.n_frames == frame_count(len(load_audio(audio_dir / name)), 24)
    for key in ENVELOPE_NAMES:
        np.testing.assert_array_equal(from_file.values[key], from_array.values[key], err_msg=key)
    np.testing.assert_array_equal(from_file.peaks, from_array.peaks)
    np.testing.assert_array_equal(from_file.beat_frames, from_array.beat_frames)
    assert from_file.bpm == from_array.bpm


def _peak_memory_of_analysis(path) -> int:
    tracemalloc.start()
    try:
        envelopes(path, fps=4)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_file_grows(tmp_path):
    rng = np.random.default_rng(0)
    peaks = []
    for seconds in (30, 90):
        path = tmp_path / f"long{seconds}.wav"
        clicks = np.zeros(seconds * SR, np.float32)
        clicks[:: SR // 2] = 0.9  # 120 bpm
        soundfile.write(path, clicks + 0.05 * rng.standard_normal(seconds * SR).astype(np.float32), SR,
                        subtype="PCM_16")
        peaks.append(_peak_memory_of_analysis(path))
    assert peaks[1] < 1.15 * peaks[0], peaks  # librosa's tempogram alone would triple
    assert peaks[1] < 150e6, peaks  # librosa's whole tempogram of 90 s would take 260 MB


@pytest.mark.parametrize("fps", [12, 30])
def test_a_single_click_peaks_on_its_own_frame(fps):
    y = np.zeros(2 * SR, np.float32)
    start, end = frame_bounds(10, fps)
    click = (start + end) // 2
    y[click: click + 64] = np.hanning(64) * 0.8
    for smoothing in (None, {"onset": Smoothing(), "flux": Smoothing()}):
        env = envelopes(y, fps=fps, smoothing=smoothing)
        onset = env.values["onset"]
        assert np.argmax(onset) == 10 and onset[10] > onset[9] and onset[10] > onset[11]
        assert np.argmax(env.values["flux"]) == 10
    assert np.argmax(envelopes(y, fps=fps).values["high"]) == 10


@pytest.mark.parametrize("samples", [np.zeros(SR, np.float32), np.full(441, 0.5, np.float32),
                                     np.zeros(1, np.float32),
                                     np.random.default_rng(1).uniform(-1, 1, 441).astype(np.float32)])
@pytest.mark.parametrize("fps", [12, 29.97, 100])
def test_every_envelope_is_finite_and_in_unit_range_for_silence_and_tiny_sounds(samples, fps):
    env = envelopes(samples, fps=fps)
    assert env.n_frames == frame_count(len(samples), fps)
    assert_in_unit_range(env)
    assert math.isfinite(env.bpm) and env.peaks.shape == (env.n_frames, 2)
    if not samples.any():
        assert env.bpm == 0 and not len(env.beat_frames)
        assert all(not values.any() for values in env.values.values())


def test_band_edges_and_centroid_on_sines():
    t = np.arange(SR) / SR
    for hz, band in ((100, "low"), (800, "mid"), (5000, "high")):
        env = envelopes(np.sin(2 * np.pi * hz * t).astype(np.float32), fps=10, smoothing=RAW)
        levels = {name: env.values[name][3:7].mean() for name in ("low", "mid", "high")}
        assert levels[band] == pytest.approx(1 / math.sqrt(2), rel=0.02), (hz, levels)
        assert sum(levels.values()) == pytest.approx(levels[band], rel=0.02)
        assert env.values["centroid"][3:7] == pytest.approx(hz / (SR / 2), rel=0.02)


def test_smooth_chain_step_by_step():
    x = np.array([0.0, 0.0, 4.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0])
    off = Smoothing(rescale="none")
    assert smooth(np.array([0.1, 0.7, 0.3]), off, 12).tobytes() == np.array([0.1, 0.7, 0.3]).tobytes()
    np.testing.assert_array_equal(smooth(x, Smoothing(median=3, rescale="none"), 12),
                                  np.clip([0, 0, 0, 0, 0, 2, 2, 2, 0, 0], 0, 1))
    fps, release = 10, 0.2
    pole = math.exp(-1 / (release * fps))
    followed = smooth(x, Smoothing(release=release, rescale="peak"), fps)
    np.testing.assert_allclose(followed[2:5], np.array([1, pole, pole ** 2]), rtol=1e-12)
    assert followed[0] == 0 and np.argmax(followed) == 2  # instant attack keeps the peak's frame
    attack = math.exp(-1 / (0.1 * fps))
    slow = smooth(np.ones(4), Smoothing(attack=0.1, rescale="none"), fps)
    np.testing.assert_allclose(slow, 1 - attack ** np.arange(1, 5), rtol=1e-12)
    np.testing.assert_array_equal(smooth(x, Smoothing(gate=2.5, rescale="peak"), 12),
                                  [0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(smooth(np.array([2.0, 3.0, 4.0]), Smoothing(rescale="minmax"), 12), [0, 0.5, 1])
    np.testing.assert_array_equal(smooth(np.full(3, 5.0), Smoothing(rescale="minmax"), 12), np.zeros(3))
    np.testing.assert_array_equal(smooth(np.zeros(3), Smoothing(), 12), np.zeros(3))


def test_parse_smoothing_merges_onto_defaults():
    chosen = parse_smoothing("onset:median=1,attack=0,release=0.15,gate=0.05; centroid:median=9,rescale=none")
    assert chosen["onset"] == Smoothing(median=1, attack=0, release=0.15, gate=0.05, rescale="peak")
    assert chosen["centroid"] == Smoothing(median=9, rescale="none")
    assert {k: v for k, v in chosen.items() if k not in ("onset", "centroid")} == \
        {k: v for k, v in DEFAULT_SMOOTHING.items() if k not in ("onset", "centroid")}
    assert parse_smoothing("") == DEFAULT_SMOOTHING


@pytest.mark.parametrize("text", ["loudness:median=3", "onset:median=4", "onset:median=x", "onset:speed=1",
                                  "onset:release=-1", "onset:rescale=log", "onset median=3", "onset:gate"])
def test_bad_smoothing_is_one_line_naming_the_flag(text):
    with pytest.raises(ParameterError) as caught:
        parse_smoothing(text)
    message = str(caught.value)
    assert message.startswith(f'--smoothing "{text}": ') and "\n" not in message and "ENVELOPE:KEY=VALUE" in message


def test_variables_are_exactly_what_schedules_may_name(voice):
    env = envelopes(voice, fps=12)
    variables = env.variables()
    assert set(variables) == {*ENVELOPE_NAMES, *GRID_NAMES, "bpm", "t", "s", "fps", "max_f"}
    np.testing.assert_array_equal(variables["t"], np.arange(env.n_frames))
    np.testing.assert_array_equal(variables["s"], np.arange(env.n_frames) / 12)
    assert variables["fps"] == 12.0 and variables["max_f"] == env.n_frames and variables["bpm"] == env.bpm


def test_snap_to_beats_moves_times_to_the_nearest_beat(voice):
    env = envelopes(voice, fps=12)
    beats = env.beat_frames / 12
    times = [0.1, float(beats[3]) + 0.02, float(beats[6]) - 0.03]
    snapped = snap_to_beats(times, env)
    assert snapped == [float(beats[np.argmin(np.abs(beats - t))]) for t in times]
    assert snapped[1] == beats[3] and snapped[2] == beats[6]
    with pytest.raises(ParameterError, match="same beat|as the one before"):
        snap_to_beats([float(beats[2]), float(beats[2]) + 0.01], env)
