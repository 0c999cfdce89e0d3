"""Schedules: numbers, expressions and keyframes evaluated exactly; one-line errors; the CSV and plot."""
import csv
import logging

import numpy as np
import pytest
from PIL import Image

from sounddiffusion.control.schedule_report import plot_schedule, write_schedule_csv
from sounddiffusion.control.schedules import MAX_KEYFRAME, clip_to_range, parse_schedule
from sounddiffusion.errors import ParameterError, ScheduleError
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, GRID_NAMES, Envelopes

N = 40
NAMES = (*ENVELOPE_NAMES, "bpm", "t", "s", "fps", "max_f")


@pytest.fixture(scope="module")
def variables() -> dict:
    rng = np.random.default_rng(3)
    values = {name: rng.random(N) for name in ENVELOPE_NAMES}
    values["beat"] = np.where(np.arange(N) % 8 == 0, 1.0, 0.25)
    t = np.arange(N, dtype=np.float64)
    return {**values, "bpm": 120.0, "t": t, "s": t / 12, "fps": 12.0, "max_f": float(N)}


def evaluate(text: str, variables: dict, n: int = N) -> np.ndarray:
    return parse_schedule(text, flag="--strength", names=NAMES).evaluate(variables, n)


@pytest.mark.parametrize("text", ["0.5", "-1e-3", " 7 ", "+2.", ".25", "1E2", "0"])
def test_a_plain_number_is_exactly_float_of_the_text_on_every_frame(text, variables):
    schedule = parse_schedule(text, flag="--scale", names=NAMES)
    assert schedule.is_constant and schedule.constant == float(text) and not schedule.names_used
    values = schedule.evaluate(variables, N)
    assert values.dtype == np.float64 and values.shape == (N,)
    assert values.tobytes() == np.full(N, float(text)).tobytes()


def test_expressions_evaluate_exactly_as_numpy_written_out(variables):
    v = variables
    onset, beat, rms, t, s = v["onset"], v["beat"], v["rms"], v["t"], v["s"]
    cases = {
        "0.35 + 0.4*onset": 0.35 + 0.4 * onset,
        "where(beat > 0.5, 0.8, 0.3)": np.where(beat > 0.5, 0.8, 0.3),
        "clip(0.2 + rms*2, 0, 1)": np.minimum(np.maximum(0.2 + rms * 2, 0), 1),
        "-onset**2 + 2**-1": -(onset ** 2) + 2 ** -1,
        "1 - 2 - 3 + 8/2/2*3": np.full(N, 1 - 2 - 3 + 8 / 2 / 2 * 3),
        "(onset >= 0.5) + (onset != rms) - (t < 3) + (t == 4) * (t <= 4)":
            (onset >= 0.5) + (onset != rms).astype(float) - (t < 3) + (t == 4) * (t <= 4.0),
        "max(onset, rms, 0.3) - min(low, high)": np.maximum(np.maximum(onset, rms), 0.3) - np.minimum(v["low"], v["high"]),
        "sin(t/12)*cos(s) + tan(0.1*mid) + abs(onset - 0.5)":
            np.sin(t / 12) * np.cos(s) + np.tan(0.1 * v["mid"]) + np.abs(onset - 0.5),
        "sqrt(flux) + exp(-centroid) + log(1 + t) + floor(t/3) + ceil(t/3)":
            np.sqrt(v["flux"]) + np.exp(-v["centroid"]) + np.log(1 + t) + np.floor(t / 3) + np.ceil(t / 3),
        "pi*bpm/60 + e - s*fps/max_f": np.pi * 120.0 / 60 + np.e - s * 12.0 / N,
        "-(-onset)": onset,
    }
    for text, expected in cases.items():
        np.testing.assert_array_equal(evaluate(text, v), np.asarray(expected, dtype=np.float64), err_msg=text)


def test_names_used_and_constant_flags():
    schedule = parse_schedule("0.35 + 0.4*onset*sin(t*pi)", flag="--strength", names=NAMES)
    assert schedule.names_used == {"onset", "t"}
    assert not schedule.is_constant and schedule.constant is None
    assert parse_schedule("2*3", flag="--scale", names=NAMES).evaluate({}, 3).tolist() == [6.0, 6.0, 6.0]


def test_keyframes_interpolate_numbers_and_hold_expressions(variables):
    t = variables["t"]
    # number -> expression: linear from 0.4 to the expression's value at frame 24, then the expression
    values = evaluate("0:(0.4), 24:(0.7 + 0.2*sin(t/12))", variables)
    at_24 = 0.7 + 0.2 * np.sin(24 / 12)
    np.testing.assert_allclose(values[:25], 0.4 + (at_24 - 0.4) * t[:25] / 24, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(values[24:], 0.7 + 0.2 * np.sin(t[24:] / 12))
    # numbers only: the first value before the first keyframe, the last after the last
    values = evaluate("10:(1), 20:(-3),", variables)
    expected = np.interp(t, [10, 20], [1, -3])
    np.testing.assert_array_equal(values, expected)
    assert values[0] == 1 and values[15] == -1 and values[-1] == -3
    # expression -> number: the expression up to the frame before, the number from its frame on
    values = evaluate("0: t*onset, 10: 0, 30: 5", variables)
    np.testing.assert_array_equal(values[:10], t[:10] * variables["onset"][:10])
    np.testing.assert_array_equal(values[10:31], np.interp(t[10:31], [10, 30], [0, 5]))
    # a keyframe past the last frame still pulls the line towards it
    np.testing.assert_allclose(evaluate("0:(0), 100:(1)", variables), t / 100, rtol=0, atol=1e-15)


@pytest.mark.parametrize("text, column, expected", [
    ("0.4 +* onset", 6, "expected a number, a name or '('"),
    ("onset.__class__", 6, "attribute access is not allowed"),
    ("__import__('os').system('ls')", 12, "unexpected character"),
    ("eval(1)", 1, "'eval' is not a function"),
    ("onset(2)", 1, "'onset' is a variable, not a function"),
    ("0.5 + loudness", 7, "unknown name 'loudness'"),
    ("sin(1, 2)", 1, "sin(x) takes 1 argument, got 2"),
    ("clip(onset, 0)", 1, "clip(x, low, high) takes 3 arguments, got 2"),
    ("max(onset)", 1, "takes at least 2 arguments"),
    ("sin", 1, "sin is a function"),
    ("(0.5 + onset", 13, "expected ')'"),
    ("0.5 onset", 5, "expected an operator or the end"),
    ("1 < onset < 2", 11, "comparisons cannot be chained"),
    ("2^3", 2, "use ** for a power"),
    ("onset = 1", 7, "use == to compare"),
    ("", 1, "expected a number, a name or '('"),
    ("1e999", 1, "too large"),
    ("0:(0.4), 96:(0.7), 50:(1)", 20, "keyframe 50 does not come after keyframe 96"),
    ("0:(0.4), 0:(1)", 10, "keyframe 0 does not come after keyframe 0"),
    ("-5:(0.4)", 1, "frame number (a whole number, 0 or more)"),
    ("1.5:(0.4)", 1, "frame number (a whole number, 0 or more)"),
    ("0:(0.4) 10:(1)", 9, "expected ',' or the end"),
    ("0:(0.4), 10", 12, "expected ':'"),
    ("0:", 3, "expected a number, a name or '('"),
    ("0.5\n+ [1]", 7, "unexpected character '['"),
])
def test_every_bad_schedule_is_one_line_naming_flag_and_column(text, column, expected):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=NAMES)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f'--strength "{text.replace(chr(10), " ")}": column {column}: '), message
    assert expected in message
    assert isinstance(caught.value, ParameterError)


def test_non_finite_values_name_the_first_bad_frame(variables):
    with pytest.raises(ScheduleError, match=r'^--scale "log\(t\)": frame 0: the value is -inf'):
        parse_schedule("log(t)", flag="--scale", names=NAMES).evaluate(variables, N)
    with pytest.raises(ScheduleError, match=r"frame 3: the value is (inf|nan)"):
        parse_schedule("0:(1), 3:(1/(t-3))", flag="--scale", names=NAMES).evaluate(variables, N)


def test_clip_to_range_warns_once_with_the_count(caplog):
    values = np.array([-0.5, 0.0, 0.2, 1.0, 1.5, 2.0, 0.7])
    with caplog.at_level(logging.WARNING):
        clipped = clip_to_range(values, low=0.0, high=1.0, flag="--strength")
    np.testing.assert_array_equal(clipped, [0.0, 0.0, 0.2, 1.0, 1.0, 1.0, 0.7])
    assert len(caplog.records) == 1
    assert "--strength" in caplog.records[0].getMessage() and "3 of 7 frames" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inside = clip_to_range(values, low=None, high=2.0, flag="--scale")
    np.testing.assert_array_equal(inside, values)
    assert not caplog.records


def _toy_envelopes(n: int = 30) -> Envelopes:
    rng = np.random.default_rng(1)
    values = {name: rng.random(n) for name in ENVELOPE_NAMES}
    values.update(bar=(np.arange(n) % 24 == 0) * 1.0, beat_in_bar=np.arange(n) // 6 % 4 * 1.0)
    peaks = np.stack([-rng.random(n), rng.random(n)], axis=1)
    from fractions import Fraction
    return Envelopes(Fraction(12), n, 120.0, np.arange(0, n, 6), values, peaks)


def test_one_frames_value_of_far_keyframes_takes_no_memory_for_the_frames_between():
    import tracemalloc

    schedule = parse_schedule(f"0:(0), 20000000:(1), {MAX_KEYFRAME}:(0.5 + onset)", flag="--strength",
                              names=("onset", "t"))
    tracemalloc.start()
    try:
        values = [schedule.value_at({"onset": 0.25, "t": float(i)}, i) for i in (10, 20000000, 30000000)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # laid out frame by frame: 8 GB for the frames up to MAX_KEYFRAME
    assert values[0] == pytest.approx(10 / 20000000) and values[1] == 1.0
    assert values[2] == pytest.approx(1 + (0.75 - 1) * 10000000 / (MAX_KEYFRAME - 20000000))


def test_schedule_csv_has_one_row_per_frame_with_exact_values(tmp_path):
    envelopes = _toy_envelopes()
    strength = np.linspace(0.2, 0.8, envelopes.n_frames)
    seed_jump = envelopes.values["beat"] > 0.5
    path = write_schedule_csv(tmp_path / "song.schedule.csv", envelopes,
                              {"strength": strength, "seed_jump": seed_jump})
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["frame", "time", *ENVELOPE_NAMES, *GRID_NAMES, "grid_bpm", "grid_beat_offset", "strength",
                       "seed_jump"]
    assert len(rows) == 1 + envelopes.n_frames
    table = np.array(rows[1:], dtype=np.float64)
    np.testing.assert_array_equal(table[:, 0], np.arange(envelopes.n_frames))
    np.testing.assert_array_equal(table[:, 1], np.arange(envelopes.n_frames) / 12)
    np.testing.assert_array_equal(table[:, 3], envelopes.values["onset"])
    np.testing.assert_array_equal(table[:, -2], strength)
    np.testing.assert_array_equal(table[:, -1], seed_jump.astype(float))
    assert not [p for p in tmp_path.iterdir() if p.name != "song.schedule.csv"]  # no temporary left


def test_schedule_csv_quotes_a_column_name_holding_a_comma(tmp_path):
    envelopes = _toy_envelopes()
    bend = np.linspace(1.0, 2.0, envelopes.n_frames)
    lora = np.linspace(0.0, 0.5, envelopes.n_frames)
    path = write_schedule_csv(tmp_path / "song.schedule.csv", envelopes,
                              {"bend multiply=max(1, onset)": bend, 'lora "a,b"': lora})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == envelopes.n_frames and len(rows[0]) == 2 + len(ENVELOPE_NAMES) + 4 + 2
    np.testing.assert_array_equal([float(row["bend multiply=max(1, onset)"]) for row in rows], bend)
    np.testing.assert_array_equal([float(row['lora "a,b"']) for row in rows], lora)
    np.testing.assert_array_equal([float(row["onset"]) for row in rows], envelopes.values["onset"])
    lines = path.read_text().splitlines()  # numbers stay bare, rows end in "\n"
    first = [0, 0.0, *(float(envelopes.values[n][0]) for n in (*ENVELOPE_NAMES, *GRID_NAMES)), 0.0, 0.0,
             float(bend[0]), float(lora[0])]
    assert lines[1] == ",".join(repr(v) for v in first)
    assert b"\r" not in path.read_bytes()


def test_schedule_plot_is_a_png_of_sensible_size(tmp_path):
    envelopes = _toy_envelopes()
    path = plot_schedule(tmp_path / "song.schedule.png", envelopes,
                         {"strength": np.linspace(0.2, 0.8, envelopes.n_frames)}, title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert 1000 <= width <= 2000 and 600 <= height <= 2000
    assert path.stat().st_size > 20_000


def test_no_python_eval_or_exec_runs(monkeypatch, variables):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("user text reached eval/exec")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert evaluate("0:(0.4), 8:(where(beat > 0.5, 1, 0) + onset)", variables).shape == (N,)


# ----------------------------------------------------------------------------- hostile texts

def test_where_takes_any_non_zero_condition_as_true(variables):
    # t - 3 is negative on frames 0..2, zero on frame 3, positive after: only frame 3 is "false"
    values = evaluate("where(t - 3, 7, 9)", variables)
    assert values[:3].tolist() == [7.0, 7.0, 7.0] and values[3] == 9.0 and set(values[4:]) == {7.0}


def test_a_long_number_before_an_operator_parses_in_linear_time():
    # The old number pattern [0-9]+\.?[0-9]* could split n digits n ways before failing on "*":
    # 5,000 digits took 1.1 s, 20,000 about 15 s. Linear parsing reads 20,000 in milliseconds.
    import time

    start = time.perf_counter()
    with pytest.raises(ScheduleError, match="column 1: the number 11111111...11111111 .20000 characters. is too large"):
        parse_schedule("1" * 20000 + "*onset", flag="--strength", names=NAMES)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text, column", [
    ("(" * 100 + "onset" + ")" * 100, 101),        # 198 parentheses raised RecursionError before
    ("-" * 100 + "onset", 101),                     # so did 498 unary minuses
    ("2**" * 100 + "2", 301),
    ("sin(" * 100 + "t" + ")" * 100, 401),
    ("0:(1), 5: " + "(" * 100 + "1" + ")" * 100, 111),
])
def test_nesting_beyond_the_limit_is_one_line_naming_the_column(text, column):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=NAMES)
    message = str(caught.value)
    assert f"column {column}: nested too deeply: at most 100 levels" in message, message
    assert len(message) < 250 and "\n" not in message


def test_nesting_up_to_the_limit_and_long_sums_evaluate(variables):
    onset, t = variables["onset"], variables["t"]
    np.testing.assert_array_equal(evaluate("(" * 99 + "onset" + ")" * 99, variables), onset)
    np.testing.assert_array_equal(evaluate("-" * 99 + "onset", variables), -onset)  # odd count: negative
    expected = np.zeros(N)
    for k in range(5000):  # 5,000 terms, added left to right (a 499-term sum raised RecursionError)
        expected = expected + onset if k % 2 == 0 else expected - t
    text = "0 + " + " + ".join("onset - t" for _ in range(2500))
    np.testing.assert_array_equal(evaluate(text, variables), expected)
    expected = np.ones(N)
    for _ in range(3000):  # ((1*onset)/onset)*onset/onset ...: 6,000 factors
        expected = expected * onset / onset
    np.testing.assert_array_equal(evaluate("1" + "*onset/onset" * 3000, variables), expected)


@pytest.mark.parametrize("text, column, words", [
    ("0:(1), 9223372036854775808:(2)", 8, "keyframe 9223372036854775808 is past the largest frame number, 1000000000"),
    ("0:(1), 1000000001:(2)", 8, "keyframe 1000000001 is past the largest frame number"),
    ("0:(1), " + "9" * 5000 + ":(2)", 8, "keyframe 99999999...99999999 (5000 characters) is past"),
])
def test_keyframes_past_the_largest_frame_are_one_line(text, column, words):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=NAMES)  # beyond int64 it was a TypeError
    assert f"column {column}: {words}" in str(caught.value), str(caught.value)
    assert len(str(caught.value)) < 250


def test_the_largest_keyframe_is_read(variables):
    values = evaluate("0:(0), 1000000000:(1)", variables)
    np.testing.assert_allclose(values, variables["t"] / 1e9, rtol=1e-15, atol=0)


@pytest.mark.parametrize("text, column, char", [
    ("\u0663", 1, "U+0663"),           # Arabic-Indic three: float() reads it as 3
    ("0.\uff15 * onset", 3, "U+FF15"),  # fullwidth five
    ("1\u00a0+ onset", 2, "U+00A0"),    # no-break space
    ("\u00a00.5", 1, "U+00A0"),         # around a plain number, str.strip() would drop it
    ("0:(1), \u0661\u0660:(2)", 8, "U+0661"),
])
def test_only_ascii_digits_and_spaces_are_read(text, column, char):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=NAMES)
    message = str(caught.value)
    assert f"column {column}: unexpected character" in message and char in message, message
    assert "only ASCII is read" in message
    assert "\u00a0" not in message  # shown as '?' in the echo and escaped in the quote


def test_a_long_bad_expression_shows_an_excerpt_around_the_column():
    text = "0.5 + " + " + ".join("0.1*onset" for _ in range(300)) + " +* 1 + " + "rms + " * 300 + "1"
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, flag="--strength", names=NAMES)
    message = str(caught.value)
    column = text.index("+* 1") + 2
    assert len(text) > 5000 and len(message) < 200, len(message)
    assert f"column {column}: expected a number, a name or '('" in message
    shown = message.split('"')[1]
    assert shown.startswith("...") and shown.endswith("...") and "+* 1" in shown
    # a short text is shown whole, so the column can be counted in it
    with pytest.raises(ScheduleError, match=r'^--strength "0.4 \+\* onset": column 6: '):
        parse_schedule("0.4 +* onset", flag="--strength", names=NAMES)


def test_one_frames_value_that_is_not_finite_names_that_frame():
    """Live mode evaluates one frame at a time: the error names the frame it happened on."""
    schedule = parse_schedule("0.5 + 0.1*log(onset)", flag="--strength", names=("onset",))
    assert schedule.value_at({"onset": 0.5}, 37) == pytest.approx(0.5 + 0.1 * np.log(0.5))
    with pytest.raises(ScheduleError, match=r'--strength "0.5 \+ 0.1\*log\(onset\)": frame 37: '):
        schedule.value_at({"onset": 0.0}, 37)
