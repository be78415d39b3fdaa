"""A bounded reader of the arithmetic in answers: LaTeX cleanup, tokens, and a recursive-descent parser.

Nothing here evaluates text as Python. The parser accepts a whitelist of forms and computes in floats,
with bounded nesting (MAX_DEPTH), integer exponents only (|k| <= MAX_EXPONENT, so `x^{99999999}` or
`9^{9^{9}}` stop at the exponent, unevaluated), bounded magnitudes and root indices. Single letters are
variables when the caller binds them to values (core.answer_match compares expressions by evaluating
both at a few fixed generic points); without bindings a letter makes the text non-numeric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DEPTH = 32
"""Nesting bound for the parser (groups and unary signs)."""
MAX_EXPONENT = 64
"""Largest |k| evaluated in `x^k`; bigger or non-integer exponents make the answer non-numeric."""
MAX_MAGNITUDE = 1e100
"""Any literal or intermediate value beyond this makes the answer non-numeric."""
MAX_ROOT_INDEX = 16

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
                       r"\s*\{([^{}]*)\}")
# Alternatives are literal-led and the repeats are single classes: no nested quantifiers to backtrack.
_DEGREE = re.compile(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\circ|\\degree|°")
# `\;` is a space (`7\;8` is two numbers, not 78); `\,` joins (`1\,000` is a thousands separator).
_REPLACE = (
    ("\\$", ""), ("$", ""), ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
    ("\\!", ""), ("\\,", ""), ("\\;", " "), ("\\:", ""), ("\\ ", " "), ("\\qquad", " "), ("\\quad", " "),
    ("~", " "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("{,}", ","),
    ("\\%", ""), ("%", ""), ("π", "\\pi "), ("√", "\\sqrt"), ("−", "-"), ("×", "\\times "),
    ("·", "\\cdot "), ("÷", "\\div "),
)


def clean(text: str) -> str:
    """Spacing, `$`, `\\left`/`\\right`, degree and percent marks removed; `\\text{}` wrappers unwrapped."""
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = _DEGREE.sub("", text)
    for _ in range(3):  # \text{\text{cm}}: one level per pass is enough for real answers
        text = _TEXT_CMD.sub(r" \1 ", text)
    return text


_NUMBER = r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_NUMBER_RE = re.compile(_NUMBER)
_TOKEN = re.compile(rf"(?P<num>{_NUMBER})|(?P<cmd>\\[A-Za-z]+)|(?P<word>[A-Za-z]+)|(?P<ws>\s+)|(?P<ch>.)", re.S)
_COMMANDS = {"\\pi": "pi", "\\sqrt": "sqrt", "\\frac": "frac", "\\cdot": "mul", "\\times": "mul",
             "\\div": "div", "\\approx": "="}
_WORDS = {"pi": "pi", "sqrt": "sqrt"}
_CHARS = {"*": "mul", "/": "div", **{c: c for c in "+-^(){}[]="}}

Token = tuple[str, str]


def tokenize(text: str) -> list[Token]:
    """(kind, text) pairs; kinds: num, pi, sqrt, frac, mul, div, the characters `+-^(){}[]=`, word, bad."""
    tokens: list[Token] = []
    for m in _TOKEN.finditer(text):
        kind, value = m.lastgroup, m.group()
        if kind == "ws":
            continue
        if kind == "cmd":
            kind = _COMMANDS.get(value, "bad")
        elif kind == "word":
            kind = _WORDS.get(value, "word")
        elif kind == "ch":
            kind = _CHARS.get(value, "bad")
        tokens.append((kind, value))
    return tokens


def _is_unit(tok: Token) -> bool:
    # Single letters are variables or choices more often than units: `2x` must not read as 2.
    return tok[0] == "word" and len(tok[1]) >= 2


def strip_units(tokens: list[Token]) -> list[Token]:
    """Trailing unit words of two or more letters dropped (`5 cm`, `25 cm^2`, `12 square units`)."""
    end = len(tokens)
    while end:
        kinds = [k for k, _ in tokens[max(0, end - 5):end]]
        if kinds[-2:] == ["^", "num"] and end >= 3 and _is_unit(tokens[end - 3]):  # cm^2
            end -= 3
        elif kinds == ["word", "^", "{", "num", "}"] and _is_unit(tokens[end - 5]):  # cm^{2}
            end -= 5
        elif _is_unit(tokens[end - 1]):
            end -= 1
        else:
            break
    return tokens[:end]


@dataclass(frozen=True)
class Value:
    value: float
    irrational: bool
    """The value involves π or a root that is not rational (`4\\sqrt{3}`, not `\\sqrt{4}`): an exact
    irrational, which a rounded decimal can only approximate."""


def evaluate(tokens: list[Token], env: dict[str, float] | None = None) -> Value | None:
    """The value of the tokens, or None when they are not a whitelisted form (or exceed a bound).
    `env` binds single letters (variables); without it any letter makes the result None."""
    parser = _Parser(tokens, env)
    try:
        value = parser.expr()
    except (_ParseError, OverflowError, ValueError, ZeroDivisionError):
        return None
    return Value(value, parser.irrational) if parser.pos == len(parser.toks) else None


class _ParseError(Exception):
    pass


def _checked(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise _ParseError("magnitude")
    return value


def _literal(text: str) -> float:
    if not _NUMBER_RE.fullmatch(text):  # a split remainder like ",000" is not a number
        raise _ParseError(text)
    return _checked(float(text.replace(",", "")))


_ATOM_START = frozenset({"num", "pi", "sqrt", "frac", "(", "{", "word"})


class _Parser:
    """Recursive descent over
        expr   := term (('+'|'-') term)*
        term   := factor (('mul'|'div') factor | factor-not-starting-with-a-number)*
        factor := ('+'|'-') factor | atom ['^' exponent]
        atom   := num | pi | letter | '(' expr ')' | '{' expr '}' | frac arg arg | sqrt ['[' int ']'] arg
        arg    := '{' expr '}' | '(' expr ')' | digit | pi | letter    (digit: LaTeX's one-character argument)
    Implicit multiplication never joins two numbers: `2 3` is not 6. A letter is a variable only when
    `env` binds it.
    """

    def __init__(self, tokens: list[Token], env: dict[str, float] | None) -> None:
        self.toks = list(tokens)
        self.env = env
        self.pos = 0
        self.depth = 0
        self.irrational = False

    def _peek(self) -> str | None:
        return self.toks[self.pos][0] if self.pos < len(self.toks) else None

    def _take(self, kind: str) -> str:
        if self._peek() != kind:
            raise _ParseError(f"expected {kind}")
        self.pos += 1
        return self.toks[self.pos - 1][1]

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError("too deep")

    def expr(self) -> float:
        self._enter()
        value = self._term()
        while (op := self._peek()) in ("+", "-"):
            self.pos += 1
            rhs = self._term()
            value = _checked(value + rhs if op == "+" else value - rhs)
        self.depth -= 1
        return value

    def _term(self) -> float:
        value = self._factor()
        while True:
            op = self._peek()
            if op in ("mul", "div"):
                self.pos += 1
            elif op in _ATOM_START and op != "num":
                op = "mul"
            else:
                return value
            rhs = self._factor()
            if op == "div":
                if rhs == 0:
                    raise _ParseError("division by zero")
                value = _checked(value / rhs)
            else:
                value = _checked(value * rhs)

    def _factor(self) -> float:
        if (sign := self._peek()) in ("+", "-"):
            self.pos += 1
            self._enter()
            value = self._factor()
            self.depth -= 1
            return -value if sign == "-" else value
        base = self._atom()
        if self._peek() != "^":
            return base
        self.pos += 1
        exponent = self._exponent()
        if base == 0 and exponent < 0:
            raise _ParseError("division by zero")
        return _checked(math.pow(base, exponent))

    def _exponent(self) -> int:
        if self._peek() != "{":
            text = self._digit()
            sign = 1
        else:
            self.pos += 1
            sign = -1 if self._peek() == "-" else 1
            if self._peek() in ("+", "-"):
                self.pos += 1
            text = self._take("num")
            self._take("}")
        # Only short plain integers: `9^{9^{9}}`, `10^{100000}` and `x^{99999999}` stop here, unevaluated.
        if not text.isascii() or not text.isdigit() or len(text) > 3 or int(text) > MAX_EXPONENT:
            raise _ParseError("exponent")
        return sign * int(text)

    def _digit(self) -> str:
        """First character of the next number token (`\\frac12`, `\\sqrt2`, `x^2`); the rest stays."""
        if self._peek() != "num":
            raise _ParseError("expected a digit")
        text = self.toks[self.pos][1]
        if len(text) == 1:
            self.pos += 1
        else:
            self.toks[self.pos] = ("num", text[1:])
        return text[0]

    def _group(self, close: str) -> float:
        self.pos += 1
        value = self.expr()
        self._take(close)
        return value

    def _arg(self) -> float:
        kind = self._peek()
        if kind == "{":
            return self._group("}")
        if kind == "(":
            return self._group(")")
        if kind in ("pi", "word"):
            return self._atom()
        return _literal(self._digit())

    def _mixed_fraction(self) -> float | None:
        """`\\frac{1}{2}` (or `\\frac12`) of plain integers with numerator < denominator, right after a
        whole number: the fractional part of a mixed number (`2\\frac{1}{2}` is 2.5, as written in
        geometry answers, not 2 * 1/2). Consumed only when it is one."""
        t = self.toks[self.pos:self.pos + 7]
        kinds = [k for k, _ in t]
        if kinds[:1] != ["frac"]:
            return None
        if kinds == ["frac", "{", "num", "}", "{", "num", "}"]:
            num, den, used = t[2][1], t[5][1], 7
        elif len(t) >= 2 and kinds[1] == "num" and len(t[1][1]) == 2:
            num, den, used = t[1][1][0], t[1][1][1], 2
        else:
            return None
        if not (num.isdigit() and den.isdigit()) or not 0 < int(num) < int(den):
            return None
        self.pos += used
        return int(num) / int(den)

    def _atom(self) -> float:
        kind = self._peek()
        if kind == "num":
            text = self._take("num")
            value = _literal(text)
            if text.isdigit() and (part := self._mixed_fraction()) is not None:
                return value + part
            return value
        if kind == "pi":
            self.pos += 1
            self.irrational = True
            return math.pi
        if kind == "word":
            name = self._take("word")
            if self.env is None or name not in self.env:
                raise _ParseError(f"unbound {name}")
            return self.env[name]
        if kind in ("(", "{"):
            return self._group(")" if kind == "(" else "}")
        if kind == "frac":
            self.pos += 1
            numerator, denominator = self._arg(), self._arg()
            if denominator == 0:
                raise _ParseError("division by zero")
            return _checked(numerator / denominator)
        if kind == "sqrt":
            self.pos += 1
            index = 2
            if self._peek() == "[":
                self.pos += 1
                text = self._take("num")
                if not text.isdigit() or len(text) > 2 or not 2 <= int(text) <= MAX_ROOT_INDEX:
                    raise _ParseError("root index")
                index = int(text)
                self._take("]")
            radicand = self._arg()
            self.irrational = self.irrational or not _rational_root(radicand, index)
            return _root(radicand, index)
        raise _ParseError(f"unexpected {kind}")


def _root(value: float, index: int) -> float:
    if value < 0:
        if index % 2 == 0:
            raise _ParseError("even root of a negative number")
        return -math.pow(-value, 1.0 / index)
    return math.sqrt(value) if index == 2 else math.pow(value, 1.0 / index)


def _rational_root(value: float, index: int) -> bool:
    """Whether the index-th root of value is rational (`\\sqrt{4}`, `\\sqrt{\\frac{9}{4}}`, `\\sqrt[3]{-8}`)."""
    ratio = Fraction(abs(value)).limit_denominator(10**6)
    if abs(float(ratio) - abs(value)) > 1e-12 * max(1.0, abs(value)):
        return False
    return _is_power(ratio.numerator, index) and _is_power(ratio.denominator, index)


def _is_power(n: int, k: int) -> bool:
    r = round(n ** (1.0 / k))
    return any(c >= 0 and c**k == n for c in (r - 1, r, r + 1))
