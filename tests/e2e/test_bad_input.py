"""A corpus of bad input through the job's own loading path and its command line.

Every bad row is named with its file and row and skipped and counted by the job's loader
(`cluster.bootstrap.load_split`, which `cluster.train` calls); images in awkward but valid modes
(CMYK, 16-bit, palette) are kept. With `data.strict=true` the job refuses the same corpus before Ray
starts (exit 2, the file and row in the message); a truncated parquet file, a missing model folder,
a model folder of another architecture and a checkpoint without a step are refused the same way, naming
the file or key.
"""

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.bootstrap import load_split
from core.config import load_config
from core.policy import load_processor

REPO = Path(__file__).resolve().parents[2]
IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _good_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))


# row -> (expected skip kind or None for kept, the row's image cell, problem, answer)
def _parquet_rows(folder: Path):
    (folder.parent / "outside.png").write_bytes(_png(_good_image()))
    sixteen = Image.fromarray(np.full((112, 112), 40000, np.uint16))
    palette = _good_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    good = {"bytes": _png(_good_image()), "path": None}
    return [
        (None, good, "<image>How many red shapes?", "3"),
        ("bad_image", {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}, "<image>Q", "1"),
        ("missing_field", good, "<image>Q", None),  # missing answer
        ("missing_field", good, "   <image>  ", "1"),  # empty problem
        (None, good, "How many blue shapes?", "2"),  # no <image>: the image goes first, as the template does
        # 1x1: scaled up to the processor's minimum, as Qwen2-VL's own smart_resize does
        (None, {"bytes": _png(Image.new("RGB", (1, 1))), "path": None}, "<image>Q", "1"),
        ("extreme_aspect", {"bytes": _png(Image.new("RGB", (1, 400))), "path": None}, "<image>Q", "1"),
        ("image_too_large", {"bytes": _png_claiming(20000, 20000), "path": None}, "<image>Q", "1"),
        (None, {"bytes": _png(Image.new("CMYK", (112, 112), (0, 255, 0, 0)).convert("RGB")), "path": None},
         "<image>Q", "1"),
        (None, {"bytes": _cmyk_jpeg(), "path": None}, "<image>Q", "1"),
        (None, {"bytes": _png(sixteen), "path": None}, "<image>Q", "1"),
        (None, {"bytes": _png(palette), "path": None}, "<image>Q", "1"),
        ("image_outside_root", {"bytes": None, "path": "../outside.png"}, "<image>Q", "1"),
        ("image_outside_root", {"bytes": None, "path": "/etc/hostname"}, "<image>Q", "1"),
        (None, good, "<image>Last good row", "4"),
    ]


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (112, 112), (0, 0, 0, 0)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = root / "data"
    data.mkdir()
    rows = _parquet_rows(data)
    table = pa.table({"images": [[r[1]] for r in rows], "problem": [r[2] for r in rows],
                      "answer": [r[3] for r in rows]},
                     schema=pa.schema([("images", IMAGES), ("problem", pa.string()), ("answer", pa.string())]))
    pq.write_table(table, data / "bad.parquet")
    (data / "img.png").write_bytes(_png(_good_image()))
    message = lambda text: json.dumps([{"role": "user", "content": [  # noqa: E731
        {"type": "image", "image": "img.png"}, {"type": "text", "text": text}]}])
    lines = [json.dumps({"message": message("Q one"), "answer": "1"}).encode(),
             b"{this is not json",
             json.dumps({"message": message("Q two"), "answer": "2"}).encode()[:-1] + b', "x": "\xff\xfe"}',
             json.dumps({"message": message("Q three"), "answer": "3"}).encode()]
    (data / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = (data / "bad.parquet").read_bytes()
    (data / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    return {"root": root, "data": data, "parquet_kinds": [r[0] for r in rows]}


def test_the_jobs_loader_names_skips_and_counts_every_bad_row(corpus, tiny_policy_dir):
    cfg = load_config(None, [f"model.path={tiny_policy_dir}"])
    processor = load_processor(tiny_policy_dir)
    from core.data import load_prompts  # the report: load_split logs it, the job counts the same rows
    from core.policy import image_size_limits

    min_px, max_px, factor = image_size_limits(processor)
    parquet = str(corpus["data"] / "bad.parquet")
    prompts, report = load_prompts([parquet], min_pixels=min_px, max_pixels=max_px, factor=factor)
    kinds = corpus["parquet_kinds"]
    want_skipped = [(parquet, row, kind) for row, kind in enumerate(kinds) if kind is not None]
    assert [(s.file, s.row, s.kind) for s in report.skipped] == want_skipped, report.skipped
    assert [p.row for p in prompts] == [row for row, kind in enumerate(kinds) if kind is None]
    assert all(p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3 for p in prompts)
    for s in report.skipped:
        assert s.message  # says what was wrong
    jsonl = str(corpus["data"] / "bad.jsonl")
    prompts, report = load_prompts([jsonl], min_pixels=min_px, max_pixels=max_px, factor=factor)
    assert [p.answer for p in prompts] == ["1", "3"]
    assert [(s.row, s.kind) for s in report.skipped] == [(1, "bad_json"), (2, "bad_json")]
    # the job's own call: the good rows of both files, in order
    kept = load_split(cfg, processor, [parquet, jsonl], None)
    assert len(kept) == kinds.count(None) + 2


def _train(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cluster.train", f"run.output_dir={tmp_path}",
                           "cluster.dashboard=false", "logging.progress_bar=false", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _refused_before_ray(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_strict_mode_refuses_the_corpus_before_ray_starts(corpus, tiny_policy_dir, tmp_path):
    parquet = corpus["data"] / "bad.parquet"
    err = _refused_before_ray(_train(tmp_path, f"model.path={tiny_policy_dir}", "model.build_tiny=false",
                                     "data.strict=true", f"data.train_files=[{parquet}]",
                                     f"data.test_files=[{parquet}]"))
    first_bad = corpus["parquet_kinds"].index("bad_image")
    assert str(parquet) in err and f"row {first_bad}" in err and "bad_image" in err, err
    jsonl = corpus["data"] / "bad.jsonl"
    err = _refused_before_ray(_train(tmp_path, f"model.path={tiny_policy_dir}", "model.build_tiny=false",
                                     "data.strict=true", f"data.train_files=[{jsonl}]", f"data.test_files=[{jsonl}]"))
    assert str(jsonl) in err and "row 1" in err and "bad_json" in err, err


def test_unusable_files_and_model_folders_are_refused_by_name(corpus, tiny_policy_dir, tmp_path):
    truncated = corpus["data"] / "truncated.parquet"
    err = _refused_before_ray(_train(tmp_path, f"model.path={tiny_policy_dir}", "model.build_tiny=false",
                                     f"data.train_files=[{truncated}]", f"data.test_files=[{truncated}]"))
    assert str(truncated) in err, err
    missing = tmp_path / "no_such_model"
    err = _refused_before_ray(_train(tmp_path, f"model.path={missing}", "model.build_tiny=false"))
    assert str(missing) in err and "model.path" in err, err
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    err = _refused_before_ray(_train(tmp_path, f"model.path={other}", "model.build_tiny=false"))
    assert str(other) in err and "'llama' is not supported" in err, err


def test_a_checkpoint_without_a_step_is_one_error_line_naming_the_file(corpus, tiny_policy_dir, tmp_path):
    ckpt = tmp_path / "old-run" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    state = ckpt / "trainer_state.json"
    jsonl = corpus["data"] / "bad.jsonl"  # never read: the checkpoint is checked first
    for written in ({"step": 2, "client_state": {"cursor": {"epoch": 0, "pos": 4}}}, {"step": 2, "client_state": None}):
        state.write_text(json.dumps(written))
        err = _refused_before_ray(_train(tmp_path, f"model.path={tiny_policy_dir}", "model.build_tiny=false",
                                         f"data.train_files=[{jsonl}]", f"data.test_files=[{jsonl}]",
                                         f"run.resume_from={ckpt.parent.parent}"))  # a run folder: its newest
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert str(state) in lines[0] and "client_state.step" in lines[0], err
