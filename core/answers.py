"""The final answer of a response, and whether the response offers more than one.

Where the answer is: in the last SCAN_CHARS characters, and there after the last `</think>` when that
part holds a box or `<answer>` tags (boxes inside the thinking are drafts, not answers); else the whole
window. The last `\\boxed{}` there is the answer, else the last `<answer>...</answer>`.

Hedging never pays (`is_hedged`): boxes that do not all agree, alternatives inside one box (`x = 7
\\text{ or } x = 8`, `7 \\lor 8`, `\\pm 3`, `7; 8`), or another answer offered right after the last box
(`\\boxed{8} or 7`). One exception, a self-correction: when the text between two boxes says the earlier
answer is wrong (`that is wrong`, `was incorrect`, `I made a mistake`), the boxes before it are retracted
and the last box is the final answer. A bare `no wait` retracts nothing: `\\boxed{3} no wait \\boxed{7}`
is still two answers.
"""

from __future__ import annotations

import re

from core.answer_match import answers_match, has_alternatives

SCAN_CHARS = 4000
"""Only the last SCAN_CHARS characters of a response are searched for an answer."""
MAX_BOXES = 16
"""Boxes compared with each other for a hedge (a response with more is a hedge)."""

_BOXED = re.compile(r"\\boxed\s*\{")
# A backslash escapes the next character, so `\{` and `\}` do not count as group braces.
_BRACE_EVENTS = re.compile(r"\\.|[{}]", re.S)
_OPEN_TAG = re.compile(r"<answer>", re.I)
_CLOSE_TAG = re.compile(r"</answer>", re.I)
_THINK_END = re.compile(r"</think>", re.I)
# "... \\boxed{8} or 7", "\\boxed{8} (or 7)": another answer offered right after the last box.
_AFTER_BOX_HEDGE = re.compile(r"\A[\s(,;.]{0,4}(?:\\text\s*\{\s*)?(?:or|\\lor|\\vee)\b[^0-9]{0,16}[0-9]", re.I)
# The text says the earlier answer is wrong. Single-class repeats between literals: linear time.
_RETRACTION = re.compile(
    r"\b(?:is|was|are|were|[’']s)\s+(?:wrong|incorrect|mistaken|not\s+(?:correct|right)|a\s+mistake|an\s+error)\b"
    r"|\b(?:made|make)\s+(?:a|an)\s+(?:mistake|error)\b|\bmy\s+(?:mistake|error)\b", re.I)


def extract_answer(response: str) -> str | None:
    """The last `\\boxed{...}`'s content, else the last `<answer>...</answer>`'s; None if empty or absent.

    The last `\\boxed{` is authoritative: if it never closes (a truncated response) or is empty, earlier
    boxes are not consulted, so a model cannot hedge with several boxes.
    """
    tail = final_section(response)
    boxed = _last_boxed(tail)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    tagged = _last_tagged(tail)
    if tagged is None:
        return None
    if _BOXED.search(tagged):
        tagged = _last_boxed(tagged) or ""
    return tagged.strip() or None


def is_hedged(response: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Whether the response offers more than one answer: boxes that do not all agree (those before a
    self-correction aside), an answer with several alternatives inside it (`x = 7 \\text{ or } x = 8`),
    or one offered after the box."""
    tail = final_section(response)
    boxes: list[tuple[str, int, int]] = []  # (content, start, end) of the boxes after the last retraction
    seen, prev_end = 0, 0
    for m in _BOXED.finditer(tail):
        content = _group_content(tail, m.end() - 1)
        if content is None or not content.strip() or _BOXED.search(content):
            continue
        seen += 1
        if seen > MAX_BOXES:
            return True
        if boxes and _RETRACTION.search(tail, prev_end, m.start()):
            boxes = []
        prev_end = m.end() + len(content) + 1
        boxes.append((content.strip(), m.start(), prev_end))
    if not boxes:
        return False
    last, _, end = boxes[-1]
    if any(not answers_match(b, last, rel_tol=rel_tol, abs_tol=abs_tol) for b, _, _ in boxes[:-1]):
        return True
    if _AFTER_BOX_HEDGE.match(tail[end:end + 40]):
        return True
    return has_alternatives(last)


def final_section(response: str) -> str:
    """The part of the response's last SCAN_CHARS that holds the final answer: after the last `</think>`
    when a box or `<answer>` tag follows it, else the whole window."""
    tail = response[-SCAN_CHARS:]
    think_end = _last_match(_THINK_END, tail)
    if think_end is None:
        return tail
    after = tail[think_end.end():]
    return after if _BOXED.search(after) or _CLOSE_TAG.search(after) else tail


def reference_text(answer: str) -> str:
    """A reference answer: normally bare, but a worked solution ending in `\\boxed{}` is accepted too."""
    boxed = _last_boxed(answer[-SCAN_CHARS:])
    return boxed.strip() if boxed and boxed.strip() else answer.strip()


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
