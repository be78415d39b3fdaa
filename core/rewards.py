"""Rule-based reward: pull the final answer out of a response and compare it with the reference.

reward = (1 - format_weight) * accuracy + format_weight * format_ok, EasyR1's 0.9 * acc + 0.1 * format.

The grader is three modules, each importable from here:
- core.answers: where the final answer is (the last `\\boxed{}` after `</think>`, else the last box, else
  `<answer>` tags) and whether the response hedges (several different answers never pay; an explicit
  self-correction, "that is wrong, ...", retracts the boxes before it);
- core.answer_match: whether two answers agree, as numbers (an exact irrational reference such as
  `4\\sqrt{3}` wants an exact answer, not `6.928`), as expressions in variables (`3+2x` is `2x+3`), or
  as normalized text (multiple-choice letters `(B)`, `B.`, `\\text{B}` all read as `b`);
- core.latex_math: the bounded reader of LaTeX arithmetic they share.

Why no library: the maintained math verifiers (math-verify, latex2sympy, the verl/EasyR1 graders) turn
LaTeX into sympy through `sympify` / `parse_expr`, which `eval` strings; on untrusted model output that
can run code or try to compute `9**9**9**9`. sympy's own LaTeX parsers do not eval, but build evaluated
expressions while parsing: `parse_latex_lark("9^{9^{9}}")` computes 9^387420489 (measured: still running
after 30 s, and a C-level big-integer power cannot be interrupted in-process), and one lark parse costs
30-60 ms here. Answers here are read by a small explicit recursive-descent parser over a whitelist of
forms, on bounded input (the last SCAN_CHARS of a response, answers of at most MAX_ANSWER_CHARS), with
bounded nesting, bounded exponents and magnitudes, float arithmetic only, and regexes that cannot
backtrack catastrophically. Nothing is ever evaluated as Python.

Numeric forms: integers, decimals, signs, thousands commas (`1,000`, `1{,}000`), `a/b`, `\\frac{a}{b}`
(`\\dfrac`, `\\tfrac`, `\\cfrac`, short `\\frac12`), `\\sqrt{n}`, `\\sqrt n`, `\\sqrt[k]{n}`, `k\\sqrt{n}`,
`\\pi` / `π` / `pi` and products like `2\\pi`, `+ - * / \\cdot \\times \\div`, parentheses and braces,
`x^k` for integer |k| <= MAX_EXPONENT, mixed numbers (`2\\frac{1}{2}` is 2.5), a leading `x =` and chains
that agree (`x = 180 - 30 - 40 = 110`). Ignored: `$`, `\\left`/`\\right`, spacing commands (`\\,` `\\;`
`\\!` `\\quad` `~`), degree marks (`60^\\circ` equals 60), percent signs (`50\\%` equals 50, not 0.5),
`\\text{...}` wrappers, trailing unit words of two or more letters (`5 cm`, `12 square units`) and
one-letter units wrapped in `\\text{}` / `\\mathrm{}` (`5\\text{ m}`; a bare `2x` stays a product).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.answer_match import (
    EXACT_REL_TOL,
    MAX_ANSWER_CHARS,
    N_POINTS,
    answers_match,
    expression_values,
    normalize_text,
    parse_number,
)
from core.answers import MAX_BOXES, SCAN_CHARS, extract_answer, is_hedged, reference_text
from core.latex_math import MAX_DEPTH, MAX_EXPONENT, MAX_MAGNITUDE, MAX_ROOT_INDEX

# The grader's names, importable from here whichever module holds them.
__all__ = ["EXACT_REL_TOL", "MAX_ANSWER_CHARS", "MAX_BOXES", "MAX_DEPTH", "MAX_EXPONENT", "MAX_MAGNITUDE",
           "MAX_ROOT_INDEX", "N_POINTS", "SCAN_CHARS", "ScoreResult", "answers_match", "expression_values",
           "extract_answer", "is_hedged", "normalize_text", "parse_number", "reference_text", "score"]


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
               and answers_match(extracted, reference_text(answer), rel_tol=rel_tol, abs_tol=abs_tol))
    accuracy = 1.0 if correct else 0.0
    reward = (1.0 - format_weight) * accuracy + format_weight * float(format_ok)
    return ScoreResult(reward=reward, accuracy=accuracy, format_ok=format_ok, extracted=extracted, hedged=hedged)
