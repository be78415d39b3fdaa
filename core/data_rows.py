"""One row of a data set: what it becomes (a `Prompt`) or why it is skipped.

`DataError` (kind, file, row) is raised by the readers of every format (core/data_parquet.py,
core/data_jsonl.py) and by the image path (core/images.py); `DataReport` counts what a read kept and
skipped; the helpers below are the checks every format shares: text fields, the problem text with
its `<image>` mark, the reference answer.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.batch import Prompt

IMAGE_MARK = "<image>"

SKIP_KINDS = {
    "bad_json": "a line that is not UTF-8 JSON, or a `message` string that is not JSON",
    "image_outside_root": "an image path that resolves outside the image folder (data file's folder or image_root)",
    "bad_type": "a field of the wrong type (row not an object, problem not a string, ...)",
    "missing_field": "a required field absent, null or empty (problem, answer, message)",
    "no_image": "no image in the row",
    "multi_image": "more than one image part in a message (a Prompt holds one image)",
    "missing_image_file": "an image path that does not exist (or a remote URL)",
    "empty_image": "zero image bytes, an empty image file or a zero-size image",
    "bad_image": "image bytes that do not decode, or an unsupported image mode",
    "image_too_large": "more pixels than the decompression-bomb cap",
    "extreme_aspect": "an aspect ratio that smart_resize refuses (over 200)",
    "problem_too_long": "a problem longer than max_problem_chars",
    "unexpected": "any other error while reading a row (a bug guard: the message has the traceback type)",
}
FILE_KINDS = ("missing_column", "bad_file")


class DataError(ValueError):
    """A bad row (or, with row None, a bad file) of a data set; `kind` is a SKIP_KINDS/FILE_KINDS key."""

    def __init__(self, kind: str, detail: str, file: str | None = None, row: int | None = None):
        self.kind = kind
        self.detail = detail
        self.file = file
        self.row = row
        where = "".join([f"{file}: " if file else "", f"row {row}: " if row is not None else ""])
        super().__init__(f"{where}{kind}: {detail}")

    def __reduce__(self):  # the default would re-call __init__ with the message only
        return (DataError, (self.kind, self.detail, self.file, self.row))


@dataclass
class SkippedRow:
    """One row left out of a data set, and why."""

    file: str
    """File the row is in."""
    row: int
    """Row (parquet) or line (JSONL) index in `file`, 0-based."""
    kind: str
    """Reason kind, a key of SKIP_KINDS."""
    message: str
    """Human-readable detail."""


@dataclass
class DataReport:
    """What a read did: rows seen, rows kept, and every skipped row with its reason."""

    rows_read: int = 0
    """Rows (non-blank lines) looked at, good or bad."""
    rows_ok: int = 0
    """Rows that became Prompts."""
    skipped: list[SkippedRow] = field(default_factory=list)
    """Every skipped row, in reading order."""
    files: list[str] = field(default_factory=list)
    """Files opened, in reading order."""

    def counts_by_kind(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.skipped).most_common())

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self.counts_by_kind().items())
        return (f"{self.rows_ok}/{self.rows_read} rows ok from {len(self.files)} file(s); "
                f"{len(self.skipped)} skipped" + (f" ({kinds})" if kinds else ""))


def text_field(value: Any, name: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise DataError("missing_field", f"`{name}` is null or absent")
        return ""
    if not isinstance(value, str):
        raise DataError("bad_type", f"`{name}` is {type(value).__name__}, not a string")
    return value


def clean_answer(value: Any) -> str:
    """Reference answer as text: numbers written out, one outer `<answer>` then `\\boxed{}` removed."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)
    text = text_field(value, "answer").strip()
    if text.startswith("<answer>") and text.endswith("</answer>"):
        text = text[len("<answer>"):-len("</answer>")].strip()
    if text.startswith("\\boxed{") and text.endswith("}") and _closing_brace(text, len("\\boxed{") - 1) == len(text) - 1:
        text = text[len("\\boxed{"):-1].strip()
    if not text:
        raise DataError("missing_field", "`answer` is empty")
    return text


def _closing_brace(text: str, start: int) -> int:
    """Index of the brace closing the one at `start`, or -1."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def checked_text(problem: str, answer: Any, max_problem_chars: int) -> tuple[str, str]:
    """Checked (problem, answer): called before the image is decoded, so bad text costs no decode."""
    problem = problem.strip()
    if not problem.replace(IMAGE_MARK, "").strip():
        raise DataError("missing_field", "problem has no text")
    if IMAGE_MARK not in problem:
        problem = IMAGE_MARK + problem
    if len(problem) > max_problem_chars:
        raise DataError("problem_too_long", f"problem has {len(problem)} characters (cap {max_problem_chars})")
    return problem, clean_answer(answer)


def make_prompt(file: str, row: int, text: tuple[str, str], solution: Any, image: np.ndarray) -> Prompt:
    return Prompt(uid=f"{os.path.basename(file)}:{row}", problem=text[0], answer=text[1], image=image,
                  source=file, row=row, solution=text_field(solution, "solution", required=False))
