"""Data sets: geometry3k parquet and MM-Eureka JSONL files read into `Prompt`s, images fitted once.

Two formats, chosen by file extension (or `fmt=`):
- geometry3k (`.parquet`, the EasyR1/verl schema): `images` (a list of {bytes, path} structs; the
  first is used), `problem` (with `<image>`), `answer`, optional `solution`. Read with pyarrow one
  record batch at a time, so a large file never becomes Python objects all at once.
- MM-Eureka (`.jsonl`, or `.json` holding JSONL or one JSON array): per line an object with `message`
  (the chat messages, as a list or as a JSON string of it) and `answer`, optional `id` (unused: the
  uid is `<file name>:<row>`) and `solution`. The problem is the user messages' text parts joined in
  order, with `<image>` where the image part stood. Image paths are relative to the file's folder (or
  `image_root`) and must stay inside it; `file://` and `data:` URIs are accepted, remote URLs are not
  fetched.

Answers of both formats are stripped of one outer `<answer>...</answer>` and then one outer
`\\boxed{...}` wrapper (`<answer>\\boxed{3}</answer>` -> `3`); numbers are written as text.

Images go through `fit_image`: decoded to RGB (transparency over white), capped against
decompression bombs and cheaply downscaled when huge, then resized once (PIL bicubic) to a size that
Qwen2-VL's `smart_resize` maps to itself, so the processor never resizes them again and every side
(engines, adversary, learner) sees exactly these pixels.

Bad rows are skipped and counted in a `DataReport` (kind, file, row), or raise `DataError` with
`strict=True`. Skip kinds: see `SKIP_KINDS`. Problems with a whole file (a missing column, an
unreadable parquet file) always raise `DataError`; a missing file raises `FileNotFoundError`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import glob
import io
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import ExifTags, Image

from core.batch import Prompt

try:  # the PIL image-processor module imports without torchvision (see STACK-NOTES.md)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover - older transformers layouts
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

log = logging.getLogger(__name__)

IMAGE_MARK = "<image>"

# Beyond this many pixels an image is refused before it is decoded. PIL's own bomb check
# (Image.MAX_IMAGE_PIXELS) still refuses above twice its limit (~179 MP) at open time.
MAX_IMAGE_PIXELS = 100_000_000

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

_FORMATS = {"geometry3k": "geometry3k", "parquet": "geometry3k", "mm_eureka": "mm_eureka", "jsonl": "mm_eureka"}
_EXTENSIONS = {".parquet": "geometry3k", ".jsonl": "mm_eureka", ".json": "mm_eureka"}
_LOG_FIRST_SKIPS = 20
_PARQUET_BATCH_ROWS = 64

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


# ---------------------------------------------------------------------------------------------------
# Images


def fitted_size(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(H, W) that `smart_resize` gives for an image of this size and maps to itself.

    smart_resize's rounding can land outside [min_pixels, max_pixels] in corner cases; iterating it
    to its fixed point means the processor, which applies it once more, keeps the size.
    """
    try:
        size = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        for _ in range(32):  # at extreme aspect ratios the clamp to `factor` makes it converge slowly
            again = smart_resize(*size, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            if again == size:
                return int(size[0]), int(size[1])
            size = again
    except ValueError as e:  # smart_resize refuses aspect ratios over 200
        raise DataError("extreme_aspect", f"{width}x{height}: {e}") from None
    raise DataError("bad_image", f"{width}x{height}: no size that smart_resize keeps "
                    f"(min_pixels={min_pixels}, max_pixels={max_pixels}, factor={factor})")


def fit_image(image: Image.Image, *, min_pixels: int, max_pixels: int, factor: int = 28, max_side: int = 8192,
              max_image_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `image` to RGB and resize it once to a size the Qwen2-VL processor keeps.

    Returns [H, W, 3] uint8 with smart_resize(H, W) == (H, W), so min_pixels <= H*W <= max_pixels.
    Images over `max_image_pixels` are refused before decoding; a side over `max_side` is first
    brought down cheaply (JPEG draft decoding, then an integer box `reduce`); EXIF orientation is
    applied. Raises DataError (kind empty_image, image_too_large, extreme_aspect or bad_image).
    May configure draft decoding on a not-yet-loaded JPEG `image`.
    """
    _check_pixels(min_pixels, max_pixels, factor)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DataError("empty_image", f"image size {width}x{height}")
    if width * height > max_image_pixels:
        raise DataError("image_too_large", f"{width}x{height} = {width * height} pixels exceeds the cap of "
                        f"{max_image_pixels} (possible decompression bomb)")
    try:
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block must not cost the image
        orientation = 1
    transpose = _ORIENTATION.get(orientation)
    upright = (width, height) if transpose is None or orientation < 5 else (height, width)
    target_h, target_w = fitted_size(upright[1], upright[0], min_pixels=min_pixels, max_pixels=max_pixels,
                                     factor=factor)

    try:
        cap = max(max_side, target_h, target_w)  # never cap below what the final resize needs
        if max(width, height) > cap:
            scale = cap / max(width, height)
            image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))  # JPEG only; else a no-op
        image.load()
        image = _reducible(image)
        if max(image.size) > cap:
            image = image.reduce(math.ceil(max(image.size) / cap))
        rgb = _to_rgb(image)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
        if rgb.size != (target_w, target_h):
            rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC)
        out = np.array(rgb, dtype=np.uint8)  # [H, W, 3] uint8, a copy owned by the caller
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        raise DataError("bad_image", f"{type(e).__name__}: {e}") from None
    fitted = smart_resize(out.shape[0], out.shape[1], factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if out.shape != (target_h, target_w, 3) or fitted != (target_h, target_w):
        raise AssertionError(f"fit_image produced {out.shape}, which smart_resize maps to {fitted}")
    return out


def _check_pixels(min_pixels: int, max_pixels: int, factor: int) -> None:
    if not (factor > 0 and 0 < min_pixels <= max_pixels and max_pixels >= factor * factor):
        raise ValueError(f"need factor > 0, 0 < min_pixels <= max_pixels and max_pixels >= factor**2, got "
                         f"min_pixels={min_pixels}, max_pixels={max_pixels}, factor={factor}")


def _reducible(image: Image.Image) -> Image.Image:
    """Same pixels in a mode where averaging neighbours (`reduce`, resize) is meaningful."""
    if image.has_transparency_data and image.mode not in ("RGBA", "LA"):
        return image.convert("RGBA")  # palette/tRNS transparency becomes a real alpha channel
    if image.mode == "P":
        return image.convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")  # keeps the 16-bit values (int32)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB image: alpha composited over white, 16-bit and float data scaled to 8 bits."""
    image = _reducible(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "I":
        return Image.fromarray(_int_to_u8(np.asarray(image))).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_float_to_u8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")  # L, RGB, CMYK, YCbCr, HSV, ...; raises for modes PIL cannot convert


def _int_to_u8(values: np.ndarray) -> np.ndarray:  # [H, W] int -> [H, W] uint8
    """Scale by the bit depth the data actually uses (12-bit data in 16-bit storage -> /4095).

    Clipping (PIL's convert("L")) would turn most of a 16-bit image white; stretching min..max would
    brighten a dark image. Negative data is shifted to start at 0 first.
    """
    v = values.astype(np.int64)
    low = min(int(v.min()), 0)
    v = v - low
    bits = max(8, int(v.max()).bit_length())
    return np.round(v * (255.0 / (2**bits - 1))).astype(np.uint8)


def _float_to_u8(values: np.ndarray) -> np.ndarray:  # [H, W] float -> [H, W] uint8
    """[0, 1] data is scaled by 255, [0, 255] data kept, anything else stretched min..max."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(v.min()), float(v.max())
    if low >= 0.0 and high <= 1.0:
        v = v * 255.0
    elif not (low >= 0.0 and high <= 255.0):
        v = (v - low) * (255.0 / (high - low))  # high > low here: a constant image fits a range above
    return np.round(np.clip(v, 0.0, 255.0)).astype(np.uint8)


def _load_image(data: Any, path: Any, base: str, fit: dict[str, Any]) -> np.ndarray:  # -> [H, W, 3] uint8
    """Decode image bytes, or the file at `path` (relative to `base`) when there are none."""
    if data is not None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DataError("bad_type", f"image bytes are {type(data).__name__}")
        if len(data) == 0:
            raise DataError("empty_image", "image bytes are empty")
        source: Any = io.BytesIO(bytes(data))
    elif path is None or path == "":
        raise DataError("no_image", "image has neither bytes nor a path")
    elif not isinstance(path, str):
        raise DataError("bad_type", f"image path is {type(path).__name__}")
    else:
        source = _resolve_image_path(path, base)
        if isinstance(source, str) and os.path.getsize(source) == 0:
            raise DataError("empty_image", f"image file {source} is empty")
        if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
            raise DataError("empty_image", "data URI holds no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # fit_image applies its own cap
            with Image.open(source) as image:
                return fit_image(image, **fit)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError("image_too_large", str(e)) from None
    except Exception as e:
        raise DataError("bad_image", f"{type(e).__name__}: {e}") from None


def _resolve_image_path(ref: str, base: str) -> str | io.BytesIO:
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise DataError("bad_image", f"data URI is not base64: {ref[:40]!r}")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise DataError("bad_image", f"data URI does not decode: {e}") from None
    if ref.startswith(("http://", "https://")):
        raise DataError("missing_image_file", f"remote image URLs are not fetched: {ref}")
    ref = ref.removeprefix("file://")
    full = os.path.join(base, ref)  # an absolute ref stays as it is
    # A data file is untrusted input: its paths must not reach files outside the image folder
    # (`../../home/user/.ssh/id_rsa`, `/etc/shadow`, or a symlink out of it).
    root = os.path.realpath(base)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise DataError("image_outside_root", f"image path {ref!r} resolves outside the image folder {root} "
                                              "(set data.image_root to the folder that holds the images)")
    if not os.path.isfile(full):
        raise DataError("missing_image_file", f"image file not found: {full}")
    return full


# ---------------------------------------------------------------------------------------------------
# Rows -> Prompts


def _text(value: Any, name: str, required: bool = True) -> str:
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
    text = _text(value, "answer").strip()
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


def _prompt_text(problem: str, answer: Any, max_problem_chars: int) -> tuple[str, str]:
    """Checked (problem, answer): called before the image is decoded, so bad text costs no decode."""
    problem = problem.strip()
    if not problem.replace(IMAGE_MARK, "").strip():
        raise DataError("missing_field", "problem has no text")
    if IMAGE_MARK not in problem:
        problem = IMAGE_MARK + problem
    if len(problem) > max_problem_chars:
        raise DataError("problem_too_long", f"problem has {len(problem)} characters (cap {max_problem_chars})")
    return problem, clean_answer(answer)


def _prompt(file: str, row: int, text: tuple[str, str], solution: Any, image: np.ndarray) -> Prompt:
    return Prompt(uid=f"{os.path.basename(file)}:{row}", problem=text[0], answer=text[1], image=image,
                  source=file, row=row, solution=_text(solution, "solution", required=False))


def _parquet_rows(file: str, opts: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(row, Prompt-making thunk) per parquet row; file-level problems raise DataError."""
    keys = opts["prompt_key"], opts["answer_key"], opts["image_key"]
    try:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
    except Exception as e:
        raise DataError("bad_file", f"not a readable parquet file ({type(e).__name__}: {e})", file) from None
    for key in keys:
        if key not in names:
            raise DataError("missing_column", f"column {key!r} not in file (columns: {names})", file)
    columns = [*keys, *(["solution"] if "solution" in names else [])]
    base = opts["image_root"] or os.path.dirname(os.path.abspath(file))
    row = 0
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            raise DataError("bad_file", f"cannot read rows from {row} on ({type(e).__name__}: {e})", file) from None
        if batch is None:
            return
        cols = {name: batch.column(name).to_pylist() for name in columns}
        for i in range(batch.num_rows):
            values = {name: cols[name][i] for name in columns}
            yield row, lambda values=values, row=row: _geometry3k_prompt(file, row, values, base, opts)
            row += 1


def _geometry3k_prompt(file: str, row: int, values: dict[str, Any], base: str, opts: dict[str, Any]) -> Prompt:
    problem = _text(values[opts["prompt_key"]], opts["prompt_key"])
    answer = values[opts["answer_key"]]
    if answer is None:
        raise DataError("missing_field", f"`{opts['answer_key']}` is null")
    text = _prompt_text(problem, answer, opts["max_problem_chars"])
    cell = values[opts["image_key"]]
    if isinstance(cell, list):  # the schema's list<struct<bytes, path>>: the first image is the one
        if not cell:
            raise DataError("no_image", f"`{opts['image_key']}` is an empty list")
        cell = cell[0]
    if cell is None:
        raise DataError("no_image", f"`{opts['image_key']}` is null")
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, bytes | bytearray | memoryview):
        data, path = cell, None
    elif isinstance(cell, str):
        data, path = None, cell
    else:
        raise DataError("bad_type", f"`{opts['image_key']}` holds {type(cell).__name__}")
    return _prompt(file, row, text, values.get("solution"), _load_image(data, path, base, opts["fit"]))


def _jsonl_rows(file: str, opts: dict[str, Any]) -> Iterator[tuple[int, Any]]:
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
                pieces.append(_text(part.get("text"), "text"))
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
    text = _prompt_text("".join(pieces), obj["answer"], opts["max_problem_chars"])
    return _prompt(file, row, text, obj.get("solution"), _load_image(None, images[0], base, opts["fit"]))


# ---------------------------------------------------------------------------------------------------
# Public entry points


def expand_paths(paths: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """Data files named by `paths`: files as given, directories' .parquet/.jsonl/.json files sorted,
    globs expanded sorted. Raises FileNotFoundError naming what matched nothing."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[str] = []
    for entry in map(os.fspath, entries):
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, n) for n in os.listdir(entry)
                           if os.path.splitext(n)[1].lower() in _EXTENSIONS and os.path.isfile(os.path.join(entry, n)))
            if not found:
                raise FileNotFoundError(errno.ENOENT, "no .parquet/.jsonl/.json files in directory", entry)
        elif glob.has_magic(entry):
            found = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(errno.ENOENT, "no data files match", entry)
        elif os.path.isfile(entry):
            found = [entry]
        else:
            raise FileNotFoundError(errno.ENOENT, "data file not found", entry)
        files.extend(found)
    return files


def _format_of(file: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in _FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; use auto or one of {sorted(_FORMATS)}")
        return _FORMATS[fmt]
    ext = os.path.splitext(file)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{file}: cannot tell the format from extension {ext!r}; pass fmt=")
    return _EXTENSIONS[ext]


def iter_prompts(paths: str | os.PathLike | list[str | os.PathLike], *, min_pixels: int, max_pixels: int,
                 factor: int = 28, report: DataReport | None = None, strict: bool = False,
                 limit: int | None = None, image_root: str | None = None, fmt: str = "auto",
                 prompt_key: str = "problem", answer_key: str = "answer", image_key: str = "images",
                 max_problem_chars: int = 8192, max_side: int = 8192,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Prompt]:
    """Stream Prompts from data files in order, filling `report` (rows read, kept, skipped).

    Bad rows are skipped, counted and logged (the first few at WARNING), or raise DataError naming
    file, row and kind when `strict`. `limit` stops after that many Prompts in all. See load_prompts.
    Arguments, paths and formats are checked at the call; files are read as the iterator advances.
    """
    report = report if report is not None else DataReport()
    _check_pixels(min_pixels, max_pixels, factor)  # a config error, not 'every row is bad'
    files = expand_paths(paths)
    formats = [_format_of(f, fmt) for f in files]  # fail on a bad extension before reading anything
    opts = dict(prompt_key=prompt_key, answer_key=answer_key, image_key=image_key, image_root=image_root,
                max_problem_chars=max_problem_chars,
                fit=dict(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor, max_side=max_side,
                         max_image_pixels=max_image_pixels))
    return _stream(files, formats, opts, report, strict, limit)


def _stream(files: list[str], formats: list[str], opts: dict[str, Any], report: DataReport, strict: bool,
            limit: int | None) -> Iterator[Prompt]:
    if limit is not None and limit <= 0:
        return
    for file, kind in zip(files, formats):
        report.files.append(file)
        rows = _parquet_rows(file, opts) if kind == "geometry3k" else _jsonl_rows(file, opts)
        for row, make in rows:
            report.rows_read += 1
            try:
                prompt = make()
            except DataError as e:
                _skip(report, file, row, e.kind, e.detail, strict)
                continue
            except Exception as e:  # bad input must never crash a training job: count it instead
                _skip(report, file, row, "unexpected", f"{type(e).__name__}: {e}", strict)
                continue
            report.rows_ok += 1
            yield prompt
            if limit is not None and report.rows_ok >= limit:
                log.info("data: %s", report.summary())
                return
    log.log(logging.WARNING if report.skipped else logging.INFO, "data: %s", report.summary())


def _skip(report: DataReport, file: str, row: int, kind: str, detail: str, strict: bool) -> None:
    if strict:
        raise DataError(kind, detail, file, row)
    report.skipped.append(SkippedRow(file=file, row=row, kind=kind, message=detail))
    n = len(report.skipped)
    if n <= _LOG_FIRST_SKIPS:
        log.warning("data: skipped %s row %d (%s): %s", file, row, kind, detail)
    elif n == _LOG_FIRST_SKIPS + 1:
        log.warning("data: more rows skipped; counting them without logging each (see DataReport)")


def load_prompts(paths: str | os.PathLike | list[str | os.PathLike], *, min_pixels: int, max_pixels: int,
                 factor: int = 28, strict: bool = False, limit: int | None = None, image_root: str | None = None,
                 fmt: str = "auto", prompt_key: str = "problem", answer_key: str = "answer",
                 image_key: str = "images", max_problem_chars: int = 8192, max_side: int = 8192,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[Prompt], DataReport]:
    """All Prompts of `paths` (files, directories or globs) and the report of what was skipped.

    `fmt`: auto (by extension: .parquet geometry3k, .jsonl/.json MM-Eureka), geometry3k/parquet or
    mm_eureka/jsonl. Image paths are relative to each data file's folder unless `image_root` is set.
    min_pixels/max_pixels/factor must be the processor's: images are fitted to them (fit_image).
    """
    report = DataReport()
    prompts = list(iter_prompts(paths, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor, report=report,
                                strict=strict, limit=limit, image_root=image_root, fmt=fmt, prompt_key=prompt_key,
                                answer_key=answer_key, image_key=image_key, max_problem_chars=max_problem_chars,
                                max_side=max_side, max_image_pixels=max_image_pixels))
    return prompts, report
