"""The music analysis an artist steers: onsets at t = 0, an exact beat grid, no invented tempo on
held sounds, tempo and first beat of a click track, sections (given and found), control tracks
aligned to the main sound's time, and TRACK.ENVELOPE names in schedules."""
import logging
import math
import re

import numpy as np
import pytest

from music_sounds import HELD, SR, click_train, hits, three_parts, write
from sounddiffusion.control.schedules import parse_schedule
from sounddiffusion.errors import ParameterError, ScheduleError
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, Smoothing, envelopes, snap_times
from sounddiffusion.sound.beats import MIN_BEAT_DB, BeatGrid
from sounddiffusion.sound.control_tracks import ControlTrack, track_envelopes, track_names, track_variables
from sounddiffusion.sound.sections import find_sections, section_envelopes, section_starts, with_sections


def frame_of_sample(position: int, fps: float) -> int:
    """The video frame holding a sample, written out: frame i covers [floor(i*sr/fps), floor((i+1)*sr/fps))."""
    return math.floor(position * fps / SR)


# ----------------------------------------------------------------------------- onsets at t = 0

@pytest.mark.parametrize("fps", [8, 30, 60])
def test_a_hit_at_t0_is_an_onset_like_the_others(fps):
    positions = [0, SR // 2, SR, 3 * SR // 2]
    env = envelopes(hits(positions, 2 * SR), fps=fps, smoothing={"onset": Smoothing()})
    onset = env.values["onset"]
    frames = [frame_of_sample(p, fps) for p in positions]
    assert frames[0] == 0 and onset[0] >= 0.8, onset[:4]
    for frame in frames:  # every hit, the first too, is a peak on its own frame
        assert onset[frame] > onset[frame + 1] and onset[frame] >= 0.8 * onset.max(), (frame, onset[frame])
    assert np.flatnonzero(onset >= 0.5).tolist() == frames


def test_a_held_sounds_start_does_not_shrink_the_later_onsets():
    t = np.arange(3 * SR) / SR
    chord = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.3 * np.sin(2 * np.pi * 277 * t)
    chord[SR:] += 0.3 * np.sin(2 * np.pi * 330 * t[SR:])  # a third note enters at 1 s
    onset = envelopes(chord.astype(np.float32), fps=10, smoothing={"onset": Smoothing()}).values["onset"]
    # the start rises from silence far more than the note at 1 s rises from the chord; capped, both peak at 1
    assert onset[0] == 1.0 and onset[10] == 1.0 and onset[1:10].max() < 0.5


# ----------------------------------------------------------------------------- beat grid

@pytest.mark.parametrize("fps", [8, 30, 29.97])
def test_a_grid_puts_beats_and_bars_exactly_where_it_says(fps):
    grid = BeatGrid(120, 0.25, 4)
    env = envelopes(np.full(5 * SR, 0.1, np.float32), fps=fps, grid=grid)
    times = 0.25 + 0.5 * np.arange(10)  # 0.25, 0.75, ... 4.75 s
    expected = [frame_of_sample(round(t * SR), env.fps) for t in times]
    assert env.beat_frames.tolist() == expected and env.bpm == 120 and env.beats_pinned
    beat, bar, in_bar = (env.values[name] for name in ("beat", "bar", "beat_in_bar"))
    assert np.flatnonzero(beat == 1).tolist() == expected
    assert np.flatnonzero(bar == 1).tolist() == [expected[0], expected[4], expected[8]]
    for first, second in zip(expected, expected[1:]):  # linear fall to 0 before the next beat
        np.testing.assert_allclose(beat[first:second], 1 - np.arange(second - first) / (second - first))
    np.testing.assert_array_equal(in_bar[expected], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    assert (in_bar[: expected[0]] == 0).all() and (beat[: expected[0]] == 0).all()


def test_a_grid_reaches_back_before_its_downbeat():
    env = envelopes(np.full(3 * SR, 0.1, np.float32), fps=10, grid=BeatGrid(120, 1.6, 4))
    assert env.beat_frames.tolist() == [1, 6, 11, 16, 21, 26]  # 0.1, 0.6, 1.1, 1.6 (downbeat), 2.1, 2.6 s
    np.testing.assert_array_equal(env.values["beat_in_bar"][env.beat_frames], [1, 2, 3, 0, 1, 2])
    assert np.flatnonzero(env.values["bar"] == 1).tolist() == [16]


@pytest.mark.parametrize("kwargs,words", [
    ({"bpm": 0}, ["--bpm 0", "above 0"]), ({"bpm": -5}, ["--bpm -5"]), ({"bpm": math.nan}, ["--bpm nan"]),
    ({"bpm": 120, "offset": -1}, ["--beat_offset -1"]), ({"bpm": 120, "beats_per_bar": 0}, ["--beats_per_bar 0"])])
def test_bad_grid_values_name_their_flag(kwargs, words):
    with pytest.raises(ParameterError) as caught:
        BeatGrid(**kwargs)
    for word in words:
        assert word in str(caught.value)


# ----------------------------------------------------------------------------- held sounds and clicks

@pytest.mark.parametrize("name", sorted(HELD))
def test_a_held_sound_has_no_tempo_and_says_so(name):
    env = envelopes(HELD[name](), fps=12)
    assert env.bpm == 0 and not len(env.beat_frames) and env.grid is None
    for key in ("beat", "bar", "beat_in_bar"):
        assert not env.values[key].any(), key
    assert "no steady pulse" in env.beat_note and "--bpm" in env.beat_note


def test_a_recorded_held_chord_has_no_tempo(audio_dir):
    env = envelopes(audio_dir / "Beethoven_chord1.wav", fps=12)  # librosa's tracker: 1 beat at 94 bpm
    assert env.bpm == 0 and not env.values["beat"].any() and "no steady pulse" in env.beat_note


@pytest.mark.parametrize("bpm,first", [(120, 0.25), (90, 0.1), (172, 0.0)])
def test_a_click_track_gives_its_tempo_and_first_beat(bpm, first):
    fps = 12
    y, positions = click_train(bpm, first, 8.0)
    env = envelopes(y, fps=fps)
    assert not env.beats_pinned and env.grid.bpm == pytest.approx(bpm, rel=0.005)
    assert env.grid.offset == pytest.approx(first, abs=0.015)  # the onset lags a click by ~10 ms
    clicks = {frame_of_sample(p, fps) for p in positions}
    assert set(env.beat_frames.tolist()) <= clicks | {c + 1 for c in clicks}
    assert f"pin them with --bpm {env.grid.bpm:g} --beat_offset {env.grid.offset:g}" in env.beat_note
    pinned = envelopes(y, fps=fps, grid=env.grid)  # copying the printed flags keeps the beats
    assert set(env.beat_frames.tolist()) <= set(pinned.beat_frames.tolist())


@pytest.mark.parametrize("bpm", [131.0, 123.7])
def test_the_printed_grid_of_a_long_click_track_stays_on_the_clicks(bpm):
    """librosa's tempo estimate is ~1 % off (131 -> 132.5 bpm): 90 s of clicks show whether the fitted
    grid follows the clicks or the estimate (which drifts a beat off within ~100 beats)."""
    seconds, fps = 90.0, 24
    y, positions = click_train(bpm, 0.351, seconds)
    grid = envelopes(y, fps=fps).grid
    assert grid.bpm == pytest.approx(bpm, abs=0.02)
    times, numbers = grid.beats(seconds)
    clicks = positions / SR
    nearest = np.abs(times[:, None] - clicks[None, :]).argmin(axis=0)
    assert np.abs(times[nearest] - clicks).max() < 0.020  # every click has a pinned beat within 20 ms
    pinned = envelopes(y, fps=fps, grid=grid)  # the printed flags copied
    in_bar = pinned.values["beat_in_bar"][pinned.beat_frames]
    assert (np.diff(np.flatnonzero(in_bar == 0)) == 4).all() and set(in_bar) == {0, 1, 2, 3}


def beat_rise(note: str) -> float:
    """How many dB the tracked beats rise, as the beats line prints it."""
    return float(re.search(r"ris(?:e|ing) ([0-9]+\.[0-9]) dB over a ", note).group(1))


@pytest.mark.parametrize("name", ["noise drone", "tremolo pad (172 bpm)"])
def test_the_beats_tracked_on_a_held_sound_rise_less_than_the_pulse_rule(name):
    env = envelopes(HELD[name](), fps=12)
    assert beat_rise(env.beat_note) < MIN_BEAT_DB and env.bpm == 0, env.beat_note


@pytest.mark.parametrize("source", ["clicks", "Toms_diner.wav", "JK_Organ2_120-F.wav"])
def test_clicks_a_voice_and_an_organ_riff_rise_more_than_the_pulse_rule(source, request):
    sound = click_train(120, 0.25, 8.0)[0] if source == "clicks" else request.getfixturevalue("audio_dir") / source
    env = envelopes(sound, fps=12)
    assert beat_rise(env.beat_note) >= MIN_BEAT_DB and env.bpm > 0 and env.grid is not None, env.beat_note


# ----------------------------------------------------------------------------- sections

def test_sections_from_times_give_index_and_starts():
    sections = section_starts([(1.0, "verse"), (2.5, "chorus"), (9.0, "outro")], duration=4.0, what="test")
    assert sections == [(0.0, ""), (1.0, "verse"), (2.5, "chorus")]  # 9 s lies after the end
    values = section_envelopes(sections, 8, 32)
    np.testing.assert_array_equal(np.flatnonzero(values["section_start"]), [0, 8, 20])
    np.testing.assert_array_equal(values["section"], [0] * 8 + [1] * 12 + [2] * 12)


def test_two_sections_on_one_frame_are_refused():
    with pytest.raises(ParameterError, match="same video frame"):
        section_envelopes([(0.0, "a"), (1.0, "b"), (1.05, "c")], 8, 32)


def test_sections_are_found_in_a_sound_of_three_parts():
    y = three_parts()
    found = find_sections([y[i:i + 65536] for i in range(0, len(y), 65536)], len(y))
    assert len(found) == 3 and found[0][0] == 0, found
    assert abs(found[1][0] - 3.0) < 0.25 and abs(found[2][0] - 6.0) < 0.25, found
    assert len(find_sections([y], len(y), count=2)) == 2
    env = with_sections(envelopes(y, fps=8), found)
    assert env.values["section"][-1] == 2 and env.values["section_start"].sum() == 3
    assert snap_times([2.9, 6.3], env, "section") == [found[1][0] // 0.125 * 0.125, found[2][0] // 0.125 * 0.125]


# ----------------------------------------------------------------------------- control tracks

def test_a_shorter_control_track_at_another_rate_is_aligned_and_warned_once(tmp_path, caplog):
    fps, rate = 8, 22050
    positions = [round((k + 0.5) / fps * rate) for k in (2, 8, 12)]  # in the middle of frames 2, 8, 12, at 22.05 kHz
    stem = write(tmp_path / "drums.wav", hits(positions, 2 * rate, sr=rate), sr=rate)
    with caplog.at_level(logging.WARNING):
        env = track_envelopes(ControlTrack("drums", stem), fps=fps, n_samples=4 * SR)
    assert env.n_frames == 32
    onset = env.values["onset"]
    assert np.flatnonzero(onset >= 0.5).tolist() == [frame_of_sample(p * 2, fps) for p in positions] == [2, 8, 12]
    assert not env.values["rms"][16:].any()  # silent after its 2 s
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "drums" in warnings[0] and "silent after its end" in warnings[0]
    longer = write(tmp_path / "long.wav", hits([SR], 6 * SR))
    caplog.clear()
    env = track_envelopes(ControlTrack("long", longer), fps=fps, n_samples=4 * SR)
    assert env.n_frames == 32 and not caplog.records


def test_track_variables_are_named_track_dot_envelope(tmp_path):
    env = envelopes(hits([SR // 2], SR), fps=8)
    variables = track_variables({"drums": env})
    assert set(variables) == set(track_names(["drums"]))
    assert {f"drums.{name}" for name in ENVELOPE_NAMES} <= set(variables) and variables["drums.bpm"] == env.bpm
    schedule = parse_schedule("0.2 + 0.6*drums.onset", flag="--strength", names=track_names(["drums"]))
    np.testing.assert_array_equal(schedule.evaluate(variables, env.n_frames), 0.2 + 0.6 * env.values["onset"])


@pytest.mark.parametrize("text,words", [
    ("drum.onset", ["'drum.onset'", "no control track 'drum'", "drums, vox"]),
    ("drums.loud", ["control track drums has no 'loud'", "onset", "beat_in_bar"]),
    ("loud", ["unknown name 'loud'", "TRACK.ENVELOPE", "drums, vox"]),
    ("drums.onset.x", ["attribute access"]),
])
def test_unknown_track_or_envelope_names_what_exists(text, words):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=("onset", *track_names(["drums", "vox"])))
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
