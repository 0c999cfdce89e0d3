"""Property-based tests of the schedule grammar (hypothesis): any text gives a Schedule or one
ScheduleError line, never another exception; valid expressions, built here as trees, give exactly
what numpy gives when the tree is evaluated by the rules written out below."""
from __future__ import annotations

import functools
import re
import string
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sounddiffusion.control.schedules import parse_schedule
from sounddiffusion.errors import ScheduleError

N = 16
RNG = np.random.default_rng(11)
VARIABLES = {"a": RNG.normal(size=N), "b": RNG.random(N), "t": np.arange(N, dtype=np.float64)}
NAMES = tuple(VARIABLES)
CONSTANTS = {"pi": np.pi, "e": np.e}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(SETTINGS, max_examples=80)  # for the slow draws (long texts)

# Levels of the grammar, lowest precedence first: what may stand on each side of an operator
# without parentheses (the grammar in sounddiffusion/control/schedule_grammar.py's docstring).
COMPARISON, SUM, PRODUCT, UNARY, ATOM = range(5)

# The meaning of each operator and function, with numpy; a comparison is 1.0 where it holds.
BINARY = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "**": np.power}
COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
           "==": np.equal, "!=": np.not_equal}
UNARY_FUNCTIONS = {name: getattr(np, name) for name in ("sin", "cos", "tan", "abs", "floor", "ceil",
                                                        "exp", "log", "sqrt")}


def _number_texts():
    digits = st.text("0123456789", min_size=1, max_size=4)
    exponent = st.one_of(st.just(""), st.builds(lambda s, d: f"e{s}{d}", st.sampled_from(["", "+", "-"]),
                                                st.integers(0, 30)))
    mantissa = st.one_of(digits, st.builds(lambda i, f: f"{i}.{f}", digits, digits),
                         st.builds(lambda f: f".{f}", digits), st.builds(lambda i: f"{i}.", digits))
    return st.builds(str.__add__, mantissa, exponent)


def _spaces():
    return st.sampled_from(["", " ", "  ", "\t", "\n"])


def _wrap(draw, node, level: int):
    """``node`` (text, its level, its value) as text that stands at ``level``: in parentheses
    when it binds more loosely, and sometimes in parentheses anyway."""
    text, own, _ = node
    if own < level or draw(st.integers(0, 9)) == 0:
        return f"({draw(_spaces())}{text}{draw(_spaces())})"
    return text


@st.composite
def leaves(draw):
    kind = draw(st.sampled_from(["number", "variable", "constant"]))
    if kind == "number":
        text = draw(_number_texts())
        return text, ATOM, float(text)
    name = draw(st.sampled_from(NAMES if kind == "variable" else tuple(CONSTANTS)))
    return name, ATOM, VARIABLES[name] if kind == "variable" else CONSTANTS[name]


def _extend(children):
    """One node above ``children`` (a strategy of (text, level, value))."""
    def binary(draw):
        op = draw(st.sampled_from([*BINARY, *COMPARE]))
        left, right = draw(children), draw(children)
        # left-associative chains: the right operand of + - must be a product, of * / a unary;
        # ** takes an atom on its left and a unary on its right (right-associative)
        level, left_level, right_level = {
            "+": (SUM, SUM, PRODUCT), "-": (SUM, SUM, PRODUCT), "*": (PRODUCT, PRODUCT, UNARY),
            "/": (PRODUCT, PRODUCT, UNARY), "**": (UNARY, ATOM, UNARY)}.get(op, (COMPARISON, SUM, SUM))
        text = f"{_wrap(draw, left, left_level)}{draw(_spaces())}{op}{draw(_spaces())}{_wrap(draw, right, right_level)}"
        if op in COMPARE:
            return text, level, np.where(COMPARE[op](left[2], right[2]), 1.0, 0.0)
        return text, level, BINARY[op](left[2], right[2])

    def sign(draw):
        op, operand = draw(st.sampled_from(["-", "+"])), draw(children)
        text = f"{op}{draw(_spaces())}{_wrap(draw, operand, UNARY)}"
        return text, UNARY, np.negative(operand[2]) if op == "-" else operand[2]

    def call(draw):
        name = draw(st.sampled_from([*UNARY_FUNCTIONS, "min", "max", "clip", "where"]))
        count = {"min": draw(st.integers(2, 4)), "max": draw(st.integers(2, 4))}.get(
            name, 3 if name in ("clip", "where") else 1)
        arguments = [draw(children) for _ in range(count)]
        text = f"{name}({', '.join(_wrap(draw, argument, COMPARISON) for argument in arguments)})"
        values = [argument[2] for argument in arguments]
        if name in UNARY_FUNCTIONS:
            value = UNARY_FUNCTIONS[name](values[0])
        elif name in ("min", "max"):
            value = functools.reduce(np.minimum if name == "min" else np.maximum, values)
        elif name == "clip":
            value = np.clip(*values)
        else:  # any condition that is not 0 is true (NaN included)
            value = np.where(np.not_equal(values[0], 0), values[1], values[2])
        return text, ATOM, value

    def quietly(build):  # NaN and inf are expected values here, not warnings
        def built(draw):
            with np.errstate(all="ignore"):
                return build(draw)
        return st.composite(built)()

    return st.one_of(quietly(binary), quietly(sign), quietly(call))


EXPRESSIONS = st.recursive(leaves(), _extend, max_leaves=12)


def _expected(value) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (N,))


@SETTINGS
@given(EXPRESSIONS, _spaces(), _spaces())
def test_valid_expressions_evaluate_as_numpy(node, before, after):
    text, _, value = node
    with np.errstate(all="ignore"):
        expected = _expected(value)
    schedule = parse_schedule(f"{before}{text}{after}", flag="--scale", names=NAMES)
    if np.isfinite(expected).all():
        np.testing.assert_array_equal(schedule.evaluate(VARIABLES, N), expected, err_msg=text)
    else:
        first_bad = int(np.flatnonzero(~np.isfinite(expected))[0])
        try:
            schedule.evaluate(VARIABLES, N)
        except ScheduleError as error:
            assert f"frame {first_bad}: the value is" in str(error), (text, str(error))
        else:
            raise AssertionError(f"{text!r} should have no finite value on frame {first_bad}")


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 40), _number_texts(), st.booleans()), min_size=1, max_size=6))
def test_number_keyframes_interpolate_as_numpy(keys):
    keys = sorted({frame: (text, negative) for frame, text, negative in keys}.items())
    text = ", ".join(f"{frame}: {'-' if negative else ''}{number}" for frame, (number, negative) in keys)
    frames = np.array([frame for frame, _ in keys], dtype=np.float64)
    values = np.array([-float(number) if negative else float(number) for _, (number, negative) in keys])
    schedule = parse_schedule(text, flag="--scale", names=NAMES)
    if not np.isfinite(values).all():
        return  # e.g. 9e30 ** ... is not reachable here; numbers themselves are finite or refused
    with np.errstate(all="ignore"):
        expected = np.interp(np.arange(N, dtype=np.float64), frames, values)
    inside = frames < N
    expected[frames[inside].astype(int)] = values[inside]
    if np.isfinite(expected).all():
        np.testing.assert_array_equal(schedule.evaluate(VARIABLES, N), expected, err_msg=text)


_KEY_VALUES = st.one_of(st.floats(-10, 10).map(repr),  # a number keyframe: interpolates
                        st.sampled_from(["0.3 + 0.2*a", "where(b > 0.5, a, -a)", "t/7", "max(a, b) - 1"]))


@SETTINGS
@given(st.dictionaries(st.integers(0, 60), _KEY_VALUES, min_size=1, max_size=6), st.integers(0, 80),
       st.floats(-2, 2), st.floats(0, 1))
def test_one_frames_keyframe_value_is_the_whole_layouts_value(keys, index, a, b):
    """Live mode (value_at: variables as floats on frame ``index``) against keyframes laid out over
    every frame up to ``index`` and the last keyframe, with those values on every frame."""
    text = ", ".join(f"{frame}: ({value})" for frame, value in sorted(keys.items()))
    schedule = parse_schedule(text, flag="--scale", names=NAMES)
    n = max(index, max(keys)) + 1
    on_frame = {"a": a, "b": b, "t": float(index)}
    whole = schedule.evaluate({name: np.full(n, value) for name, value in on_frame.items()}, n)
    assert schedule.value_at(on_frame, index) == whole[index], text


@FEWER
@given(EXPRESSIONS, st.lists(st.sampled_from(["(", "-", "+", "sin(", "abs(", "2**", "max(1, "]),
                             min_size=1, max_size=5), st.integers(0, 250))
def test_deep_nesting_is_evaluated_or_refused_at_the_limit(node, pattern, depth):
    openers = [pattern[i % len(pattern)] for i in range(depth)]
    text = "".join(openers) + node[0] + "".join(")" for opener in openers if "(" in opener)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default, which hypothesis raises while it runs a test
    try:
        parse_schedule(text, flag="--scale", names=NAMES).evaluate(VARIABLES, N)
    except ScheduleError as error:
        message = str(error)
        assert "nested too deeply" in message or "not a finite number" in message, message
        if "nested too deeply" in message:
            assert len(openers) + node[0].count("(") + node[0].count("-") + node[0].count("+") >= 99, message
    finally:
        sys.setrecursionlimit(limit)


NON_ASCII_DIGITS = st.characters(categories=["Nd"]).filter(lambda char: not char.isascii())
NON_ASCII_SPACES = st.characters(categories=["Zs", "Zl", "Zp"]).filter(lambda char: not char.isascii())


@FEWER
@given(EXPRESSIONS, st.one_of(NON_ASCII_DIGITS, NON_ASCII_SPACES, st.characters(min_codepoint=128)),
       st.data())
def test_a_character_outside_ascii_is_refused_at_its_column(node, char, data):
    # a valid expression with one character replaced or inserted: a Unicode digit for an ASCII
    # one (float() would read it), a Unicode space (str.split() would skip it), or anything else
    text = node[0]
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if digits and char.isdigit() and data.draw(st.booleans()):
        position = data.draw(st.sampled_from(digits))
        text = text[:position] + char + text[position + 1:]
    else:
        position = data.draw(st.integers(0, len(text)))
        text = text[:position] + char + text[position:]
    try:
        parse_schedule(text, flag="--scale", names=NAMES)
    except ScheduleError as error:
        # refused at the character (or before it, where replacing a digit left e.g. "-." behind)
        column = int(re.search(r": column (\d+): ", str(error)).group(1))
        assert column <= position + 1, (text, str(error))
        if column == position + 1:
            assert "unexpected character" in str(error) and "only ASCII is read" in str(error), str(error)
    else:
        raise AssertionError(f"{text!r} was read as a schedule")


# Texts made of the grammar's own pieces (and a few strangers) reach the parser's corners far more
# often than arbitrary unicode does; both must give a Schedule or one ScheduleError line.
PIECES = ["(", ")", ",", ":", "-", "+", "*", "/", "**", "<", "<=", "==", "!=", ">", " ", "0", "1", "7.5",
          ".5", "1e3", "2.", "9" * 30, "a", "b", "t", "pi", "e", "sin", "min", "max", "clip", "where", "log",
          "x", "__import__", ".", "'", "[", "^", "=", "\u0663", "\u00a0", "\n", "1e400"]


def _any_text():
    return st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
                     st.text(max_size=40), st.text(string.printable, max_size=40))


@SETTINGS
@given(_any_text())
def test_any_text_is_a_schedule_or_one_schedule_error_line(text):
    try:
        schedule = parse_schedule(text, flag="--scale", names=NAMES)
        values = schedule.evaluate(VARIABLES, N)
    except ScheduleError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message and message.startswith("--scale "), message
        assert len(message) < 400, message
    else:
        assert values.shape == (N,) and values.dtype == np.float64 and np.isfinite(values).all()
