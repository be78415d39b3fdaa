"""Data sets: geometry3k parquet and MM-Eureka JSONL files read into `Prompt`s, images fitted once.

The entry points are `load_prompts` (a list and a report) and `iter_prompts` (a stream). Formats are
chosen by file extension (or `fmt=`):
- geometry3k (`.parquet`): core/data_parquet.py;
- MM-Eureka (`.jsonl`, or `.json` holding JSONL or one JSON array): core/data_jsonl.py. Image paths
  are relative to the file's folder (or `image_root`) and must stay inside it; `file://` and
  `data:` URIs are accepted, remote URLs are not fetched.

Answers of both formats are stripped of one outer `<answer>...</answer>` and then one outer
`\\boxed{...}` wrapper (`<answer>\\boxed{3}</answer>` -> `3`); numbers are written as text
(core/data_rows.py). Images go through `fit_image` (core/images.py): decoded to RGB, capped against
decompression bombs, resized once to a size Qwen2-VL's `smart_resize` maps to itself.

Bad rows are skipped and counted in a `DataReport` (kind, file, row), or raise `DataError` with
`strict=True`. Skip kinds: see `SKIP_KINDS`. Problems with a whole file (a missing column, an
unreadable parquet file) always raise `DataError`; a missing file raises `FileNotFoundError`.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

from core.batch import Prompt
from core.data_jsonl import jsonl_rows
from core.data_parquet import parquet_rows
from core.data_rows import FILE_KINDS, IMAGE_MARK, SKIP_KINDS, DataError, DataReport, SkippedRow, clean_answer
from core.images import MAX_IMAGE_PIXELS, check_pixels, fit_image, fitted_size
from core.node_cache import default_cache_root
from core.storage import Storage

__all__ = [
    "FILE_KINDS", "IMAGE_MARK", "MAX_IMAGE_PIXELS", "SKIP_KINDS", "DataError", "DataReport", "SkippedRow",
    "clean_answer", "expand_paths", "fit_image", "fitted_size", "iter_prompts", "load_prompts",
]

log = logging.getLogger(__name__)

_FORMATS = {"geometry3k": "geometry3k", "parquet": "geometry3k", "mm_eureka": "mm_eureka", "jsonl": "mm_eureka"}
_EXTENSIONS = {".parquet": "geometry3k", ".jsonl": "mm_eureka", ".json": "mm_eureka"}
_LOG_FIRST_SKIPS = 20


def expand_paths(paths: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """Data files named by `paths`: files as given, directories' .parquet/.jsonl/.json files sorted,
    globs expanded sorted. A storage URI (s3://, gs://, ...) names a file, a folder or a glob in its last
    part; its files are copied into this node's cache (`_remote_files`) and their local copies returned.
    Raises FileNotFoundError naming what matched nothing."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[str] = []
    for entry in map(os.fspath, entries):
        if "://" in entry and not entry.startswith("file://"):
            found = _remote_files(entry)
        elif os.path.isdir(entry):
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


def _remote_files(uri: str) -> list[str]:
    """Local copies of the data files a storage URI names, under `<node cache>/data/<hash of the URI>/`;
    a copy is fetched again when its size differs from the stored file's. Only the data files come:
    JSONL image paths relative to a remote file are not fetched (embed them, or use a local folder)."""
    parent, name = posixpath.split(uri.rstrip("/"))
    if glob.has_magic(name):
        folder = Storage(parent)
        names = [n for n in folder.list() if fnmatch.fnmatch(n, name) and folder.size(n) is not None]
    elif Storage(uri).size() is not None:
        folder, names = Storage(parent), [name]
    else:
        folder = Storage(uri)
        names = [n for n in folder.list() if os.path.splitext(n)[1].lower() in _EXTENSIONS]
    if not names:
        raise FileNotFoundError(errno.ENOENT, "no data files in storage at", uri)
    local = default_cache_root() / "data" / hashlib.sha256(folder.uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    out = []
    for n in sorted(names):
        dest, size = local / n, folder.size(n)
        if not dest.is_file() or dest.stat().st_size != size:
            tmp = local / f".{n}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.write_bytes(folder.read_bytes(n))
            os.replace(tmp, dest)  # two processes fetching at once each write whole files
            log.info("fetched %s/%s into %s", folder.uri, n, dest)
        out.append(str(dest))
    return out


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
    check_pixels(min_pixels, max_pixels, factor)  # a config error, not 'every row is bad'
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
        rows = parquet_rows(file, opts) if kind == "geometry3k" else jsonl_rows(file, opts)
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
