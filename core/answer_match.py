"""Whether two answers are the same: as numbers, as expressions in variables, else as normalized text.

Numbers (core.latex_math's forms) compare with math.isclose at the caller's tolerance, except against an
exact irrational reference (one whose value involves π or a root that is not rational: `4\\sqrt{3}`,
`2\\pi`): that wants an exact answer, so the tolerance is float round-off (EXACT_REL_TOL) and the
rounded decimal `6.928` does not pay for `4\\sqrt{3}` while `\\sqrt{48}` and `0.5\\sqrt{3}` forms do. A
decimal reference (`6.93`) or a rational one (`\\frac{1}{3}`, whose decimals are the usual way to write
it, `0.5` for `\\frac{1}{2}`) keeps the caller's tolerance.

Expressions in single-letter variables (`2x+3`, `2(x+1)`, `\\frac{1}{2}x`) are equal when they agree at
N_POINTS fixed generic points (each letter bound to a distinct value in [0.5, 2.5) that is no simple
number): a polynomial identity test. Two different expressions of the bounded size read here that agree
at all points are not a practical worry; that is the trade for never building a symbolic expression
(sympy's LaTeX parsers evaluate `9^{9^{9}}` while parsing, see core.rewards) and for microsecond cost.
"""

from __future__ import annotations

import math
import re

from core.latex_math import Token, Value, clean, evaluate, strip_units, tokenize

MAX_ANSWER_CHARS = 200
"""Longer answers are never parsed as numbers or expressions (they can still match as text)."""
EXACT_REL_TOL = 1e-10
"""Tolerance against an exact irrational reference: round-off only, so no rounded decimal passes."""
N_POINTS = 4
"""Points at which two expressions in variables must agree."""

_HEDGE_WORDS = frozenset({"or", "either", "nor"})
_HEDGE_COMMANDS = re.compile(r"\\(?:lor|vee|pm|mp)(?![A-Za-z])")
# `5\text{ m}`, `25 \mathrm{m}^2`: a one-letter word is a unit only when it is wrapped like this (a bare
# `2x` is a product); it becomes a word of the unit kind that strip_units drops.
_TEXT_LETTER = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|operatorname)\s*\{\s*([A-Za-z])\s*\}")
_CHOICE = re.compile(r"\(?([a-z])\)?[.:]?")


def answers_match(predicted: str, reference: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Equal as numbers when both sides are numbers; else equal as expressions (when both read as one)
    or as normalized text."""
    a, b = _value(predicted, None), _value(reference, None)
    if a is not None and b is not None:
        return _close(a, b, rel_tol, abs_tol)
    if _expressions_match(predicted, reference, rel_tol, abs_tol):
        return True
    return normalize_text(predicted) == normalize_text(reference)


def parse_number(text: str) -> float | None:
    """The value of a whitelisted numeric/LaTeX form, or None. Never evaluates anything as code.

    `x = 5` reads as 5; a chain `x = 180 - 30 - 40 = 110` must agree with itself (every side after the
    first, and the first when it is a number, has the value of the last), so `x = 7 \\text{ or } x = 8`
    and `7 = 8` are not numbers (they compare as text, and fail).
    """
    value = _value(text, None)
    return None if value is None else value.value


def expression_values(text: str) -> tuple[float, ...] | None:
    """The answer's values at the N_POINTS fixed points (its letters bound), or None when it does not read
    as an expression. A number reads as a constant expression."""
    values = _point_values(text)
    return None if values is None else tuple(v.value for v in values)


def normalize_text(text: str) -> str:
    """Text form for non-numeric answers: cleaned, no whitespace, lower case, choice letters bare."""
    text = "".join(clean(text).split()).lower().rstrip(".")
    m = _CHOICE.fullmatch(text)
    return m.group(1) if m else text


def has_alternatives(answer: str) -> bool:
    """`7 \\text{ or } 8`, `x = 7 \\text{ or } x = 8`, `\\pm 3`, `7; 8`: more than one answer in one box.
    Spacing commands (`\\;12\\;`) are not separators."""
    cleaned = clean(answer)
    if _HEDGE_COMMANDS.search(cleaned) or ";" in cleaned:
        return True
    return any(kind == "word" and value.lower() in _HEDGE_WORDS for kind, value in tokenize(cleaned))


def _close(a: Value, b: Value, rel_tol: float, abs_tol: float) -> bool:
    if b.irrational:  # b is the reference: an exact irrational wants an exact answer
        rel_tol, abs_tol = min(rel_tol, EXACT_REL_TOL), min(abs_tol, 1e-12)
    return math.isclose(a.value, b.value, rel_tol=rel_tol, abs_tol=abs_tol)


def _expressions_match(predicted: str, reference: str, rel_tol: float, abs_tol: float) -> bool:
    a = _point_values(predicted)
    b = _point_values(reference) if a is not None else None
    return a is not None and b is not None and all(_close(x, y, rel_tol, abs_tol) for x, y in zip(a, b))


def _point(letter: str, k: int) -> float:
    # A golden-ratio walk over letters and points: distinct per letter and per point, never a small
    # integer or simple fraction, positive so that `\sqrt{x}` is defined.
    return 0.5 + 2.0 * ((ord(letter) * 0.6180339887498949 + k * 0.7548776662466927) % 1.0)


def _point_values(text: str) -> list[Value] | None:
    tokens = _tokens(text)
    if tokens is None:
        return None
    letters = {v for kind, v in tokens if kind == "word" and len(v) == 1}
    values = []
    for k in range(N_POINTS):
        value = _chain_value(tokens, {c: _point(c, k) for c in letters})
        if value is None:
            return None
        values.append(value)
    return values


def _tokens(text: str) -> list[Token] | None:
    if len(text) > MAX_ANSWER_CHARS or has_alternatives(text):
        return None
    return tokenize(clean(_TEXT_LETTER.sub(r" \1unit ", text)))


def _value(text: str, env: dict[str, float] | None) -> Value | None:
    tokens = _tokens(text)
    return None if tokens is None else _chain_value(tokens, env)


def _chain_value(tokens: list[Token], env: dict[str, float] | None) -> Value | None:
    """The last side of `a = b = c`, when every earlier side agrees with it; the first side may instead
    name what the answer is (`x`, `AB`, `m\\angle 1`, `y` in `y = 2x + 3`)."""
    sides: list[list[Token]] = [[]]
    for tok in tokens:
        if tok[0] == "=":
            sides.append([])
        else:
            sides[-1].append(tok)
    last = strip_units(sides[-1])
    value = evaluate(last, env) if last else None
    if value is None or len(sides) == 1:
        return value
    for i, raw in enumerate(sides[:-1]):
        side = strip_units(raw)
        other = evaluate(side, env) if side else None
        if other is not None and math.isclose(other.value, value.value, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if i == 0 and raw and raw[0][0] in ("word", "bad") and not any(v in ",;" for _, v in raw):
            continue  # a label
        return None
    return value
