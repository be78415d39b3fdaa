"""geometry3k parquet files (the EasyR1/verl schema) read row by row into `Prompt`s.

Columns: `images` (a list of {bytes, path} structs; the first is used), `problem` (with `<image>`),
`answer`, optional `solution`; the first three names are configurable (data.prompt_key, ...). Read
with pyarrow one record batch at a time, so a large file never becomes Python objects all at once.
A missing column or an unreadable file raises `DataError` for the whole file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from core.batch import Prompt
from core.data_rows import DataError, checked_text, make_prompt, text_field
from core.images import load_image

PARQUET_BATCH_ROWS = 64  # rows per record batch: bounds the Python objects alive at once


def parquet_rows(file: str, opts: dict[str, Any]) -> Iterator[tuple[int, Any]]:
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
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
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
    problem = text_field(values[opts["prompt_key"]], opts["prompt_key"])
    answer = values[opts["answer_key"]]
    if answer is None:
        raise DataError("missing_field", f"`{opts['answer_key']}` is null")
    text = checked_text(problem, answer, opts["max_problem_chars"])
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
    return make_prompt(file, row, text, values.get("solution"), load_image(data, path, base, opts["fit"]))
