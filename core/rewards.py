"""Rule-based reward: pull the final answer out of a response and compare it with the reference.

reward = (1 - format_weight) * accuracy + format_weight * format_ok, EasyR1's 0.9 * acc + 0.1 * format.

Why no library: the maintained math verifiers (math-verify, latex2sympy, the verl/EasyR1 graders) turn
LaTeX into sympy through `sympify` / `parse_expr`, which `eval` strings; on untrusted model output that
can run code or try to compute `9**9**9**9`. Answers here are read by a small explicit recursive-descent
parser over a whitelist of forms, on bounded input (the last SCAN_CHARS of a response, answers of at
most MAX_ANSWER_CHARS), with bounded nesting, bounded exponents and magnitudes, float arithmetic only,
and regexes that cannot backtrack catastrophically. Nothing is ever evaluated as Python.

Numeric forms (compared with math.isclose): integers, decimals, signs, thousands commas (`1,000`,
`1{,}000`), `a/b`, `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`, `\\cfrac`, short `\\frac12`), `\\sqrt{n}`, `\\sqrt n`,
`\\sqrt[k]{n}`, `k\\sqrt{n}`, `\\frac{k\\sqrt{n}}{m}`, `\\pi` / `π` / `pi` and products like `2\\pi`,
`+ - * / \\cdot \\times \\div`, parentheses and braces, `x^k` for integer |k| <= MAX_EXPONENT, a leading
`x =`. Ignored: `$`, `\\left`/`\\right`, spacing commands, degree marks (`^\\circ`, `^{\\circ}`, `°`,
`\\degree`: `60^\\circ` equals 60), percent signs (`50\\%` equals 50, not 0.5), `\\text{...}` wrappers
and trailing unit words of two or more letters (`5 cm`, `12 square units`, `60 degrees`). Anything
else, or a side that does not parse, is compared as normalized text (no spaces, `\\text{}` and `$`
removed, lower case); multiple-choice letters `(B)`, `B.`, `\\text{B}` all read as `b`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SCAN_CHARS = 4000
"""Only the last SCAN_CHARS characters of a response are searched for an answer."""
MAX_ANSWER_CHARS = 200
"""Longer answers are never parsed as numbers (they can still match as text)."""
MAX_DEPTH = 32
"""Nesting bound for the parser (groups and unary signs)."""
MAX_EXPONENT = 64
"""Largest |k| evaluated in `x^k`; bigger or non-integer exponents make the answer non-numeric."""
MAX_MAGNITUDE = 1e100
"""Any literal or intermediate value beyond this makes the answer non-numeric."""
MAX_ROOT_INDEX = 16


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    """(1 - format_weight) * accuracy + format_weight * format_ok."""
    accuracy: float
    """1.0 when the extracted answer matches the reference, else 0.0."""
    format_ok: bool
    """Whether an answer could be extracted (a non-empty `\\boxed{}` or `<answer>` pair)."""
    extracted: str | None
    """The extracted answer text, stripped; None when there is none."""


def score(response: str, answer: str, *, format_weight: float = 0.1, rel_tol: float = 1e-4,
          abs_tol: float = 1e-6) -> ScoreResult:
    """Score one response against its reference answer; bounded time on any input."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    extracted = extract_answer(response)
    format_ok = extracted is not None
    correct = format_ok and answers_match(extracted, _reference_text(answer), rel_tol=rel_tol, abs_tol=abs_tol)
    accuracy = 1.0 if correct else 0.0
    reward = (1.0 - format_weight) * accuracy + format_weight * float(format_ok)
    return ScoreResult(reward=reward, accuracy=accuracy, format_ok=format_ok, extracted=extracted)


# ---------------------------------------------------------------------------------------------------------
# Extraction

_BOXED = re.compile(r"\\boxed\s*\{")
# A backslash escapes the next character, so `\{` and `\}` do not count as group braces.
_BRACE_EVENTS = re.compile(r"\\.|[{}]", re.S)
_OPEN_TAG = re.compile(r"<answer>", re.I)
_CLOSE_TAG = re.compile(r"</answer>", re.I)


def extract_answer(response: str) -> str | None:
    """The last `\\boxed{...}`'s content, else the last `<answer>...</answer>`'s; None if empty or absent.

    The last `\\boxed{` is authoritative: if it never closes (a truncated response) or is empty, earlier
    boxes are not consulted, so a model cannot hedge with several boxes.
    """
    tail = response[-SCAN_CHARS:]
    boxed = _last_boxed(tail)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    tagged = _last_tagged(tail)
    if tagged is None:
        return None
    if _BOXED.search(tagged):
        tagged = _last_boxed(tagged) or ""
    return tagged.strip() or None


def _last_match(pattern: re.Pattern[str], text: str, endpos: int | None = None) -> re.Match[str] | None:
    last = None
    for m in pattern.finditer(text, 0, len(text) if endpos is None else endpos):
        last = m
    return last


def _last_boxed(text: str) -> str | None:
    last = _last_match(_BOXED, text)
    return None if last is None else _group_content(text, last.end() - 1)


def _group_content(text: str, open_idx: int) -> str | None:
    """Content of the brace group opened at text[open_idx], or None if it never closes."""
    depth = 0
    for m in _BRACE_EVENTS.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1:m.start()]
    return None


def _last_tagged(text: str) -> str | None:
    close = _last_match(_CLOSE_TAG, text)
    if close is None:
        return None
    opened = _last_match(_OPEN_TAG, text, close.start())
    return None if opened is None else text[opened.end():close.start()]


def _reference_text(answer: str) -> str:
    # References are normally bare, but a worked solution ending in \boxed{} is accepted too.
    boxed = _last_boxed(answer[-SCAN_CHARS:])
    return boxed.strip() if boxed and boxed.strip() else answer.strip()


# ---------------------------------------------------------------------------------------------------------
# Comparison

def answers_match(predicted: str, reference: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Equal as numbers when both sides parse as one, else equal as normalized text."""
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize_text(predicted) == normalize_text(reference)


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
                       r"\s*\{([^{}]*)\}")
# Alternatives are literal-led and the repeats are single classes: no nested quantifiers to backtrack.
_DEGREE = re.compile(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\circ|\\degree|°")
_REPLACE = (
    ("\\$", ""), ("$", ""), ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
    ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "), ("\\qquad", " "), ("\\quad", " "),
    ("~", " "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("{,}", ","),
    ("\\%", ""), ("%", ""), ("π", "\\pi "), ("√", "\\sqrt"), ("−", "-"), ("×", "\\times "),
    ("·", "\\cdot "), ("÷", "\\div "),
)
_CHOICE = re.compile(r"\(?([a-z])\)?[.:]?")


def _clean(text: str) -> str:
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = _DEGREE.sub("", text)
    for _ in range(3):  # \text{\text{cm}}: one level per pass is enough for real answers
        text = _TEXT_CMD.sub(r" \1 ", text)
    return text


def normalize_text(text: str) -> str:
    """Text form for non-numeric answers: cleaned, no whitespace, lower case, choice letters bare."""
    text = "".join(_clean(text).split()).lower().rstrip(".")
    m = _CHOICE.fullmatch(text)
    return m.group(1) if m else text


_NUMBER = r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_NUMBER_RE = re.compile(_NUMBER)
_TOKEN = re.compile(rf"(?P<num>{_NUMBER})|(?P<cmd>\\[A-Za-z]+)|(?P<word>[A-Za-z]+)|(?P<ws>\s+)|(?P<ch>.)", re.S)
_COMMANDS = {"\\pi": "pi", "\\sqrt": "sqrt", "\\frac": "frac", "\\cdot": "mul", "\\times": "mul",
             "\\div": "div", "\\approx": "="}
_WORDS = {"pi": "pi", "sqrt": "sqrt"}
_CHARS = {"*": "mul", "/": "div", **{c: c for c in "+-^(){}[]="}}

Token = tuple[str, str]


def _tokenize(text: str) -> list[Token]:
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


def _strip_units(tokens: list[Token]) -> list[Token]:
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


def parse_number(text: str) -> float | None:
    """The value of a whitelisted numeric/LaTeX form, or None. Never evaluates anything as code."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    tokens = _tokenize(_clean(text))
    for i in range(len(tokens) - 1, -1, -1):  # `x = 5`: the value is what follows the last `=`
        if tokens[i][0] == "=":
            tokens = tokens[i + 1:]
            break
    tokens = _strip_units(tokens)
    return _Parser(tokens).parse() if tokens else None


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


_ATOM_START = frozenset({"num", "pi", "sqrt", "frac", "(", "{"})


class _Parser:
    """Recursive descent over
        expr   := term (('+'|'-') term)*
        term   := factor (('mul'|'div') factor | factor-not-starting-with-a-number)*
        factor := ('+'|'-') factor | atom ['^' exponent]
        atom   := num | pi | '(' expr ')' | '{' expr '}' | frac arg arg | sqrt ['[' int ']'] arg
        arg    := '{' expr '}' | '(' expr ')' | digit | pi       (digit: LaTeX's one-character argument)
    Implicit multiplication never joins two numbers: `2 3` is not 6.
    """

    def __init__(self, tokens: list[Token]) -> None:
        self.toks = list(tokens)
        self.pos = 0
        self.depth = 0

    def parse(self) -> float | None:
        try:
            value = self._expr()
        except (_ParseError, OverflowError, ValueError, ZeroDivisionError):
            return None
        return value if self.pos == len(self.toks) else None

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

    def _expr(self) -> float:
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
        # Only short plain integers: `9^{9^{9}}` and `10^{100000}` stop here, unevaluated.
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
        value = self._expr()
        self._take(close)
        return value

    def _arg(self) -> float:
        kind = self._peek()
        if kind == "{":
            return self._group("}")
        if kind == "(":
            return self._group(")")
        if kind == "pi":
            self.pos += 1
            return math.pi
        return _literal(self._digit())

    def _atom(self) -> float:
        kind = self._peek()
        if kind == "num":
            return _literal(self._take("num"))
        if kind == "pi":
            self.pos += 1
            return math.pi
        if kind == "(":
            return self._group(")")
        if kind == "{":
            return self._group("}")
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
            return _root(self._arg(), index)
        raise _ParseError(f"unexpected {kind}")


def _root(value: float, index: int) -> float:
    if value < 0:
        if index % 2 == 0:
            raise _ParseError("even root of a negative number")
        return -math.pow(-value, 1.0 / index)
    return math.sqrt(value) if index == 2 else math.pow(value, 1.0 / index)
