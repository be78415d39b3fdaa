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
`+ - * / \\cdot \\times \\div`, parentheses and braces, `x^k` for integer |k| <= MAX_EXPONENT, mixed numbers
(`2\\frac{1}{2}` is 2.5), a leading `x =` and chains that agree (`x = 180 - 30 - 40 = 110`).
Ignored: `$`, `\\left`/`\\right`, spacing commands, degree marks (`^\\circ`, `^{\\circ}`, `°`,
`\\degree`: `60^\\circ` equals 60), percent signs (`50\\%` equals 50, not 0.5), `\\text{...}` wrappers,
trailing unit words of two or more letters (`5 cm`, `12 square units`, `60 degrees`) and one-letter units
wrapped in `\\text{}` / `\\mathrm{}` (`5\\text{ m}`, `25 \\text{ m}^2`; a bare `2x` stays a product). Anything
else, or a side that does not parse, is compared as normalized text (no spaces, `\\text{}` and `$`
removed, lower case); multiple-choice letters `(B)`, `B.`, `\\text{B}` all read as `b`.

Hedging never pays: a response that offers more than one answer scores as wrong whatever the
reference (`is_hedged`): boxes that do not all agree, alternatives inside one box (`x = 7 \\text{ or }
x = 8`, `7 \\lor 8`, `\\pm 3`, `7; 8`), or another answer offered right after the box (`\\boxed{8} or 7`).
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
    hedged: bool = False
    """The response gives more than one answer (boxes that differ, `7 or 8`, an answer after the box):
    scored as wrong whatever the reference, so hedging never pays."""


def score(response: str, answer: str, *, format_weight: float = 0.1, rel_tol: float = 1e-4,
          abs_tol: float = 1e-6) -> ScoreResult:
    """Score one response against its reference answer; bounded time on any input."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    extracted = extract_answer(response)
    format_ok = extracted is not None
    hedged = format_ok and is_hedged(response, rel_tol=rel_tol, abs_tol=abs_tol)
    correct = (format_ok and not hedged
               and answers_match(extracted, _reference_text(answer), rel_tol=rel_tol, abs_tol=abs_tol))
    accuracy = 1.0 if correct else 0.0
    reward = (1.0 - format_weight) * accuracy + format_weight * float(format_ok)
    return ScoreResult(reward=reward, accuracy=accuracy, format_ok=format_ok, extracted=extracted, hedged=hedged)


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


# "... \\boxed{8} or 7", "\\boxed{8} (or 7)": another answer offered right after the last box.
_AFTER_BOX_HEDGE = re.compile(r"\A[\s(,;.]{0,4}(?:\\text\s*\{\s*)?(?:or|\\lor|\\vee)\b[^0-9]{0,16}[0-9]", re.I)
MAX_BOXES = 16
"""Boxes compared with each other for a hedge (a response with more is a hedge)."""


def is_hedged(response: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Whether the response offers more than one answer: boxes that do not all agree, an answer with
    several alternatives inside it (`x = 7 \\text{ or } x = 8`, `7, 8`), or one offered after the box."""
    tail = response[-SCAN_CHARS:]
    boxes = []
    for m in _BOXED.finditer(tail):
        content = _group_content(tail, m.end() - 1)
        if content is not None and content.strip() and not _BOXED.search(content):
            boxes.append((content.strip(), m.end() - 1 + len(content) + 2))
        if len(boxes) > MAX_BOXES:
            return True
    if not boxes:
        return False
    last, end = boxes[-1]
    if any(not answers_match(b, last, rel_tol=rel_tol, abs_tol=abs_tol) for b, _ in boxes[:-1]):
        return True
    if _AFTER_BOX_HEDGE.match(tail[end:end + 40]):
        return True
    return _has_alternatives(last)


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


_HEDGE_WORDS = frozenset({"or", "either", "nor"})
_HEDGE_COMMANDS = re.compile(r"\\(?:lor|vee|pm|mp)(?![A-Za-z])")
# `5\text{ m}`, `25 \mathrm{m}^2`: a one-letter word is a unit only when it is wrapped like this (a bare
# `2x` is a product); it becomes a word of the unit kind that _strip_units drops.
_TEXT_LETTER = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|operatorname)\s*\{\s*([A-Za-z])\s*\}")


def _has_alternatives(answer: str) -> bool:
    """`7 \\text{ or } 8`, `x = 7 \\text{ or } x = 8`, `\\pm 3`, `7; 8`: more than one answer in one box."""
    if _HEDGE_COMMANDS.search(answer) or ";" in answer:
        return True
    return any(kind == "word" and value.lower() in _HEDGE_WORDS for kind, value in _tokenize(_clean(answer)))


def parse_number(text: str) -> float | None:
    """The value of a whitelisted numeric/LaTeX form, or None. Never evaluates anything as code.

    `x = 5` reads as 5; a chain `x = 180 - 30 - 40 = 110` must agree with itself (every side after the
    first, and the first when it is a number, has the value of the last), so `x = 7 \\text{ or } x = 8`
    and `7 = 8` are not numbers (they compare as text, and fail).
    """
    if len(text) > MAX_ANSWER_CHARS or _has_alternatives(text):
        return None
    tokens = _tokenize(_clean(_TEXT_LETTER.sub(r" \1unit ", text)))
    sides: list[list[Token]] = [[]]
    for tok in tokens:
        if tok[0] == "=":
            sides.append([])
        else:
            sides[-1].append(tok)
    value = _Parser(_strip_units(sides[-1])).parse() if _strip_units(sides[-1]) else None
    if value is None or len(sides) == 1:
        return value
    for i, raw in enumerate(sides[:-1]):
        side = _strip_units(raw)
        other = _Parser(side).parse() if side else None
        if other is None and i == 0 and raw and raw[0][0] in ("word", "bad") and not any(v in ",;" for _, v in raw):
            continue  # the first side names what the answer is (`x`, `AB`, `m\\angle 1`)
        if other is None or not math.isclose(other, value, rel_tol=1e-9, abs_tol=1e-12):
            return None
    return value


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
