"""The small expression language of per-frame schedules: tokens, a recursive-descent parser and
a syntax tree evaluated with numpy over all frames at once (numpy only; no ``eval``/``exec``).

Grammar (lowest precedence first; ``**`` binds tighter than a unary minus, as in Python)::

    expression := sum [("<" | "<=" | ">" | ">=" | "==" | "!=") sum]
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := ("-" | "+") unary | power
    power      := atom ["**" unary]
    atom       := NUMBER | NAME | FUNCTION "(" expression ("," expression)* ")" | "(" expression ")"

A comparison gives 1.0 where it holds and 0.0 elsewhere. Names are the variables the caller
allows and the constants ``pi`` and ``e``; a name may hold one dot, ``TRACK.ENVELOPE``
(``drums.onset``: an envelope of a control track). Functions are exactly those in :data:`FUNCTIONS`.
Only ASCII is read: digits 0-9, and spaces, tabs and line breaks of ASCII (other digits, such as
Arabic-Indic or fullwidth ones, and other spaces, such as a no-break space, are mistakes).

Parsing takes time linear in the text's length: the tokens are read by a regular expression that
cannot backtrack, sums and products of any length are flat :class:`Chain` nodes, and nesting
(parentheses, function calls, signs, powers) is limited to :data:`MAX_NESTING` levels, which keeps
the recursive descent and the evaluation far from Python's recursion limit.
Every mistake is a :class:`SyntaxProblem` with the 0-based offset into the text and what was
expected there; :mod:`sounddiffusion.control.schedules` turns it into a one-line error.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

CONSTANTS = {"pi": math.pi, "e": math.e}

MAX_NESTING = 100
"""The most levels of parentheses, function calls, signs and powers inside one another."""

# name -> (numpy function, smallest and largest argument count (None: any), how to call it)
FUNCTIONS = {
    "sin": (np.sin, 1, 1, "sin(x)"),
    "cos": (np.cos, 1, 1, "cos(x)"),
    "tan": (np.tan, 1, 1, "tan(x)"),
    "abs": (np.abs, 1, 1, "abs(x)"),
    "floor": (np.floor, 1, 1, "floor(x)"),
    "ceil": (np.ceil, 1, 1, "ceil(x)"),
    "exp": (np.exp, 1, 1, "exp(x)"),
    "log": (np.log, 1, 1, "log(x)"),
    "sqrt": (np.sqrt, 1, 1, "sqrt(x)"),
    "min": (np.minimum, 2, None, "min(a, b, ...)"),
    "max": (np.maximum, 2, None, "max(a, b, ...)"),
    "clip": (lambda x, low, high: np.minimum(np.maximum(x, low), high), 3, 3, "clip(x, low, high)"),
    "where": (lambda c, a, b: np.where(np.asarray(c) != 0, a, b), 3, 3, "where(condition, a, b)"),
}

_BINARY = {
    "+": np.add, "-": np.subtract, "*": np.multiply, "/": np.true_divide, "**": np.power,
    "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
    "==": np.equal, "!=": np.not_equal,
}
_COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
"""A number's text, ASCII digits only; each digit can be matched in one way only, so a match
never backtracks over the digits (``[0-9]+\.?[0-9]*`` could split a run of n digits n ways)."""

_TOKEN = re.compile(rf"""
    (?P<space>[ \t\n\r\f\v]+)
  | (?P<number>{NUMBER})
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z][A-Za-z_0-9]*)?)
  | (?P<op>\*\*|<=|>=|==|!=|[-+*/<>(),:])
""", re.VERBOSE)

EXPECTED_OPERAND = "expected a number, a name or '('"


class SyntaxProblem(Exception):
    """A mistake at ``offset`` (0-based) in the text: ``message`` says what was expected."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset, self.message = offset, message


@dataclass(frozen=True)
class Token:
    kind: str  # "number", "name", "op" or "end"
    text: str
    offset: int


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an ``end`` token; SyntaxProblem at a character that
    starts no token (``.`` of an attribute, quotes, brackets, ``^``, ...)."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            if not char.isascii():
                raise SyntaxProblem(pos, f"unexpected character {char!r} (U+{ord(char):04X}): only ASCII is "
                                    f"read; write digits as 0-9 and spaces as plain spaces")
            hint = {"^": "use ** for a power", ".": "attribute access is not allowed",
                    "=": "use == to compare"}.get(char, "use numbers, names, functions and + - * / ** ( ) , :")
            raise SyntaxProblem(pos, f"unexpected character {char!r}: {hint}")
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup, match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# Syntax tree: each node evaluates to a float or a float64 array over the frames.

@dataclass(frozen=True)
class Number:
    value: float

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        return self.value


@dataclass(frozen=True)
class Name:
    name: str

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        if self.name in CONSTANTS:
            return CONSTANTS[self.name]
        value = variables[self.name]
        return float(value) if np.ndim(value) == 0 else np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class Negate:
    operand: object

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        return np.negative(self.operand.evaluate(variables))


@dataclass(frozen=True)
class Binary:
    operator: str
    left: object
    right: object

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        result = _BINARY[self.operator](self.left.evaluate(variables), self.right.evaluate(variables))
        return np.asarray(result, dtype=np.float64) if self.operator in _COMPARISONS else result


@dataclass(frozen=True)
class Chain:
    """``first op1 operand1 op2 operand2 ...`` for a sum (``+ -``) or a product (``* /``) of any
    length, evaluated left to right: ((first op1 operand1) op2 operand2) ... (a flat node, so that
    a sum of thousands of terms needs no deep recursion)."""
    first: object
    rest: tuple  # ((operator, node), ...)

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        result = self.first.evaluate(variables)
        for operator, node in self.rest:
            result = _BINARY[operator](result, node.evaluate(variables))
        return result


@dataclass(frozen=True)
class Call:
    function: str
    arguments: tuple

    def evaluate(self, variables: Mapping) -> np.ndarray | float:
        function = FUNCTIONS[self.function][0]
        values = [argument.evaluate(variables) for argument in self.arguments]
        if self.function in ("min", "max"):
            result = values[0]
            for value in values[1:]:
                result = function(result, value)
            return result
        return function(*values)


def names_in(node) -> frozenset[str]:
    """The variable names (not constants) that ``node`` reads."""
    if isinstance(node, Name):
        return frozenset() if node.name in CONSTANTS else frozenset({node.name})
    children = {Negate: lambda n: (n.operand,), Binary: lambda n: (n.left, n.right),
                Chain: lambda n: (n.first, *(operand for _, operand in n.rest)),
                Call: lambda n: n.arguments}.get(type(node), lambda n: ())(node)
    return frozenset().union(*(names_in(child) for child in children))


class Parser:
    """Recursive descent over the tokens of one text; :meth:`expression` reads one expression
    and leaves the position after it (the caller checks what follows). Every recursion passes
    through :meth:`unary`, which counts the nesting and refuses more than :data:`MAX_NESTING`.
    ``hints``: for names that exist only with some flag, what to give to have them
    (``{"section": "give --sections ..."}``)."""

    def __init__(self, tokens: list[Token], names: Collection[str], hints: Mapping[str, str] | None = None):
        self.tokens, self.names, self.position, self.depth = tokens, frozenset(names), 0, 0
        self.hints = dict(hints or {})

    @property
    def current(self) -> Token:
        return self.tokens[self.position]

    def advance(self) -> Token:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def at(self, *operators: str) -> bool:
        return self.current.kind == "op" and self.current.text in operators

    def expect(self, operator: str, what: str) -> Token:
        if not self.at(operator):
            raise SyntaxProblem(self.current.offset, f"expected {what}, found {describe(self.current)}")
        return self.advance()

    def expression(self):
        left = self.sum()
        if self.at(*_COMPARISONS):
            operator = self.advance().text
            left = Binary(operator, left, self.sum())
            if self.at(*_COMPARISONS):
                raise SyntaxProblem(self.current.offset, "comparisons cannot be chained: "
                                    "use parentheses, e.g. (a < b) * (b < c)")
        return left

    def sum(self):
        return self._chain(self.product, ("+", "-"))

    def product(self):
        return self._chain(self.unary, ("*", "/"))

    def _chain(self, operand, operators: tuple[str, ...]):
        first, rest = operand(), []
        while self.at(*operators):
            operator = self.advance().text
            rest.append((operator, operand()))
        return Chain(first, tuple(rest)) if rest else first

    def unary(self):
        if self.depth >= MAX_NESTING:
            raise SyntaxProblem(self.current.offset, f"nested too deeply: at most {MAX_NESTING} levels of "
                                f"parentheses, function calls, signs and powers inside one another")
        self.depth += 1
        try:
            if self.at("-"):
                self.advance()
                return Negate(self.unary())
            if self.at("+"):
                self.advance()
                return self.unary()
            node = self.atom()
            if self.at("**"):
                self.advance()
                node = Binary("**", node, self.unary())
            return node
        finally:
            self.depth -= 1

    def atom(self):
        token = self.current
        if token.kind == "number":
            self.advance()
            value = float(token.text)
            if not math.isfinite(value):
                raise SyntaxProblem(token.offset, f"the number {shorten(token.text)} is too large")
            return Number(value)
        if token.kind == "name":
            self.advance()
            if self.at("("):
                return self.call(token)
            if token.text in FUNCTIONS:
                raise SyntaxProblem(token.offset, f"{token.text} is a function: call it as "
                                    f"{FUNCTIONS[token.text][3]}")
            if token.text not in self.names and token.text not in CONSTANTS:
                raise SyntaxProblem(token.offset, self.unknown(token.text))
            return Name(token.text)
        if self.at("("):
            self.advance()
            node = self.expression()
            self.expect(")", "')'")
            return node
        raise SyntaxProblem(token.offset, f"{EXPECTED_OPERAND}, found {describe(token)}")

    def unknown(self, name: str) -> str:
        """Why ``name`` cannot be read, naming what exists."""
        if name in self.hints:
            return f"'{name}' {self.hints[name]}"
        tracks = sorted({known.split(".")[0] for known in self.names if "." in known})
        if "." in name:
            track, _, key = name.partition(".")
            if track not in tracks:
                given = (f"the control tracks are {', '.join(tracks)}" if tracks
                         else f"no control track is given (add --control {track}=FILE)")
                return f"'{name}': there is no control track '{track}'; {given}"
            keys = [known.partition(".")[2] for known in sorted(self.names) if known.startswith(track + ".")]
            return f"'{name}': control track {track} has no '{key}'; it has {', '.join(keys)}"
        plain = sorted(known for known in self.names if "." not in known) + sorted(CONSTANTS)
        more = f", and TRACK.ENVELOPE of the control tracks {', '.join(tracks)}" if tracks else ""
        return f"unknown name '{name}'; the names are {', '.join(plain)}{more}"

    def call(self, name: Token):
        if name.text not in FUNCTIONS:
            kind = "a variable, not a function" if name.text in self.names | set(CONSTANTS) else "not a function"
            raise SyntaxProblem(name.offset, f"'{name.text}' is {kind}; the functions are "
                                f"{', '.join(FUNCTIONS)}")
        self.advance()  # "("
        arguments = [self.expression()]
        while self.at(","):
            self.advance()
            arguments.append(self.expression())
        self.expect(")", "',' or ')'")
        _, least, most, usage = FUNCTIONS[name.text]
        if len(arguments) < least or (most is not None and len(arguments) > most):
            wanted = f"{least}" if least == most else f"at least {least}"
            raise SyntaxProblem(name.offset, f"{usage} takes {wanted} argument{'s' * (wanted != '1')}, "
                                f"got {len(arguments)}")
        return Call(name.text, tuple(arguments))


def describe(token: Token) -> str:
    """How a token is named in an error message."""
    return "the end" if token.kind == "end" else f"'{shorten(token.text)}'"


def shorten(text: str) -> str:
    """A token's text for a message: whole up to 20 characters, else its ends and its length."""
    return text if len(text) <= 20 else f"{text[:8]}...{text[-8:]} ({len(text)} characters)"
