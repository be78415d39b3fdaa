"""MM-Eureka JSONL files (`.jsonl`, or `.json` holding JSONL or one JSON array) read into `Prompt`s.

Per line an object with `message` (the chat messages, as a list or as a JSON string of it) and
`answer`, optional `id` (unused: the uid is `<file name>:<row>`) and `solution`. The problem is the
user messages' text parts joined in order, with `<image>` where the image part stood (system
messages are dropped: the policy's own chat template supplies one). One image per row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from core.batch import Prompt
from core.data_rows import IMAGE_MARK, DataError, checked_text, make_prompt, text_field
from core.images import load_image


def jsonl_rows(file: str, opts: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(line, Prompt-making thunk) per non-blank line (or per element of a `.json` array)."""
    base = opts["image_root"] or os.path.dirname(os.path.abspath(file))
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if file.endswith(".json") and head.startswith(b"["):
            try:
                items = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise DataError("bad_file", f"not a JSON array ({e})", file) from None
            for row, item in enumerate(items):
                yield row, lambda item=item, row=row: _mm_eureka_prompt(file, row, item, base, opts)
            return
        for row, raw in enumerate(f):
            if not raw.strip():
                continue
            yield row, lambda raw=raw, row=row: _mm_eureka_prompt(file, row, _json_line(raw), base, opts)


def _json_line(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError("bad_json", f"{type(e).__name__}: {e}") from None


def _mm_eureka_prompt(file: str, row: int, obj: Any, base: str, opts: dict[str, Any]) -> Prompt:
    if not isinstance(obj, dict):
        raise DataError("bad_type", f"row is a JSON {type(obj).__name__}, not an object")
    messages = obj.get("message")
    if messages is None or messages == "":
        raise DataError("missing_field", "`message` is null or absent")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise DataError("bad_json", f"`message` string is not JSON: {e}") from None
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list):
        raise DataError("bad_type", f"`message` is {type(messages).__name__}, not a list")
    pieces: list[str] = []
    images: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise DataError("bad_type", f"a message is {type(message).__name__}, not an object")
        if message.get("role", "user") != "user":  # system prompts come from the policy's own template
            continue
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise DataError("bad_type", f"message content is {type(content).__name__}")
        for part in [content] if isinstance(content, str) else content or []:
            if isinstance(part, str):
                pieces.append(part)
            elif not isinstance(part, dict):
                raise DataError("bad_type", f"a content part is {type(part).__name__}")
            elif part.get("type") == "text" or ("text" in part and "type" not in part):
                pieces.append(text_field(part.get("text"), "text"))
            elif part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part:
                ref = part.get("image", part.get("image_url"))
                if isinstance(ref, dict):  # OpenAI style {"image_url": {"url": ...}}
                    ref = ref.get("url")
                if not isinstance(ref, str) or not ref:
                    raise DataError("bad_type" if ref is not None else "no_image", "image part without a path")
                images.append(ref)
                pieces.append(IMAGE_MARK)
            else:
                raise DataError("bad_type", f"unsupported content part type {part.get('type')!r}")
    if not images:
        raise DataError("no_image", "no image part in the user messages")
    if len(images) > 1:
        raise DataError("multi_image", f"{len(images)} image parts")
    if "answer" not in obj or obj["answer"] is None:
        raise DataError("missing_field", "`answer` is null or absent")
    text = checked_text("".join(pieces), obj["answer"], opts["max_problem_chars"])
    return make_prompt(file, row, text, obj.get("solution"), load_image(None, images[0], base, opts["fit"]))
