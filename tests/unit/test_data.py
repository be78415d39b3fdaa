import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_bytes import encode, png_claiming, rgb
from PIL import Image

from core import data, data_parquet
from core.data import DataError, DataReport, iter_prompts, load_prompts

PIX = dict(min_pixels=56 * 56, max_pixels=224 * 224)  # 112x112 is a fixed point of smart_resize here

IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
SCHEMA = pa.schema([("images", IMAGES_TYPE), ("problem", pa.string()), ("answer", pa.string()),
                    ("solution", pa.string())])


def row(image_bytes=None, problem="<image>Find x.", answer="3", solution="x = 3, so \\boxed{3}", path=None,
        images="default"):
    if images == "default":
        images = [{"bytes": image_bytes if image_bytes is not None or path else encode(rgb(112, 112)),
                   "path": path}]
    return {"images": images, "problem": problem, "answer": answer, "solution": solution}


def write_parquet(path, rows, schema=SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def write_jsonl(path, objs):
    lines = [o if isinstance(o, str | bytes) else json.dumps(o) for o in objs]
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return str(path)


def eureka(image="images/a.png", text="What is the value?", answer="<answer>3</answer>", as_string=True, **extra):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": content}]
    return {"id": "x", "message": json.dumps(messages) if as_string else messages, "answer": answer, **extra}


# ---------------------------------------------------------------------------------------------------
# Readers: good files


def test_parquet_round_trip(tmp_path):
    imgs = [rgb(112, 112, 1), rgb(112, 168, 2), rgb(37, 91, 3)]
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(encode(imgs[1]))
    path = write_parquet(tmp_path / "train.parquet", [
        row(encode(imgs[0]), problem="<image>Find x.", answer="3", solution="so \\boxed{3}"),
        row(None, path="pics/p.png", problem="Find the area of the triangle.", answer="12", solution=None),
        row(encode(imgs[2]), problem="Find y. <image>", answer=" <answer>\\boxed{\\frac{1}{2}}</answer> "),
    ])
    prompts, report = load_prompts(path, **PIX)
    assert [p.uid for p in prompts] == ["train.parquet:0", "train.parquet:1", "train.parquet:2"]
    assert [p.row for p in prompts] == [0, 1, 2] and all(p.source == path for p in prompts)
    assert [p.problem for p in prompts] == ["<image>Find x.", "<image>Find the area of the triangle.", "Find y. <image>"]
    assert [p.answer for p in prompts] == ["3", "12", "\\frac{1}{2}"]
    assert [p.solution for p in prompts] == ["so \\boxed{3}", "", "x = 3, so \\boxed{3}"]
    assert np.array_equal(prompts[0].image, imgs[0]) and np.array_equal(prompts[1].image, imgs[1])
    h, w = data.fitted_size(37, 91, **PIX)
    expected = np.array(Image.fromarray(imgs[2]).resize((w, h), Image.Resampling.BICUBIC))
    assert np.array_equal(prompts[2].image, expected)
    assert (report.rows_read, report.rows_ok, report.skipped, report.files) == (3, 3, [], [path])
    assert report.summary().startswith("3/3 rows ok from 1 file(s); 0 skipped")


def test_parquet_without_solution_and_custom_keys_and_image_root(tmp_path):
    img = rgb(112, 112)
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(encode(img))
    schema = pa.schema([("pics", IMAGES_TYPE), ("question", pa.string()), ("label", pa.string())])
    path = write_parquet(tmp_path / "d.parquet", [{"pics": [{"bytes": None, "path": "a.png"}], "question": "Q?",
                                                  "label": "7"}], schema)
    prompts, _ = load_prompts(path, **PIX, prompt_key="question", answer_key="label", image_key="pics",
                              image_root=str(root))
    assert prompts[0].problem == "<image>Q?" and prompts[0].answer == "7" and prompts[0].solution == ""
    assert np.array_equal(prompts[0].image, img)


def test_parquet_is_read_in_batches_with_global_row_numbers(tmp_path, monkeypatch):
    png = encode(rgb(56, 56))
    rows = [row(png, answer=str(i)) for i in range(150)]
    rows[100]["images"] = []  # a bad row in the second batch keeps its own number
    path = write_parquet(tmp_path / "big.parquet", rows)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real(self, *a, **kw):
            sizes.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    prompts, report = load_prompts(path, **PIX)
    assert max(sizes) <= 64 and sum(sizes) == 150
    assert len(prompts) == 149 and [p.answer for p in prompts] == [str(i) for i in range(150) if i != 100]
    assert [(s.row, s.kind) for s in report.skipped] == [(100, "no_image")]


def test_jsonl_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    a, b = rgb(112, 112, 1), rgb(140, 84, 2)
    (tmp_path / "images" / "a.png").write_bytes(encode(a))
    (tmp_path / "images" / "b.jpg").write_bytes(encode(b, "JPEG", quality=95))
    mid = {"message": [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                                    {"type": "image", "image": "images/b.jpg"},
                                                    {"type": "text", "text": " how many?"}]}],
           "answer": 5, "solution": "count: \\boxed{5}"}
    path = write_jsonl(tmp_path / "eureka.jsonl", [
        eureka("images/a.png", "What is the value?", "<answer>3</answer>"),
        "",  # blank lines are not rows, but line numbers still count them
        mid,
        eureka("file://images/a.png", "Value?", "\\boxed{x+1}", as_string=False),
        {"message": {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/a.png"}},
                                                 "Plain string part."]}, "answer": "A"},
    ])
    prompts, report = load_prompts(path, **PIX)
    assert [p.uid for p in prompts] == ["eureka.jsonl:0", "eureka.jsonl:2", "eureka.jsonl:3", "eureka.jsonl:4"]
    assert [p.problem for p in prompts] == ["<image>What is the value?", "Look: <image> how many?",
                                            "<image>Value?", "<image>Plain string part."]
    assert [p.answer for p in prompts] == ["3", "5", "x+1", "A"]
    assert [p.solution for p in prompts] == ["", "count: \\boxed{5}", "", ""]
    assert np.array_equal(prompts[0].image, a) and np.array_equal(prompts[3].image, a)
    jpeg = np.array(Image.open(tmp_path / "images" / "b.jpg").convert("RGB"))
    assert prompts[1].image.shape == (140, 84, 3) and np.array_equal(prompts[1].image, jpeg)
    assert (report.rows_read, report.rows_ok) == (4, 4)


def test_jsonl_image_root_and_data_uri(tmp_path):
    import base64

    img = rgb(112, 112)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "z.png").write_bytes(encode(img))
    uri = "data:image/png;base64," + base64.b64encode(encode(img)).decode()
    (tmp_path / "sub").mkdir()
    path = write_jsonl(tmp_path / "sub" / "e.jsonl", [eureka("z.png"), eureka(uri)])
    prompts, report = load_prompts(path, **PIX, image_root=str(tmp_path / "imgs"))
    assert report.rows_ok == 2 and all(np.array_equal(p.image, img) for p in prompts)


def test_json_array_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode(rgb(112, 112)))
    path = tmp_path / "e.json"
    path.write_text(json.dumps([eureka(answer="1"), eureka(answer="2")]))
    prompts, _ = load_prompts(str(path), **PIX)
    assert [(p.uid, p.answer) for p in prompts] == [("e.json:0", "1"), ("e.json:1", "2")]


# ---------------------------------------------------------------------------------------------------
# Bad rows


def _parquet_case(kind, tmp_path):
    """(bad row for a geometry3k file) per kind."""
    return {
        "bad_image": lambda: row(b"\x89PNG\r\n\x1a\n this is not an image"),
        "missing_field": lambda: row(problem=None),
        "no_image": lambda: row(images=[]),
        "missing_image_file": lambda: row(None, path="nowhere/missing.png"),
        "empty_image": lambda: row(b""),
        "image_too_large": lambda: row(png_claiming(30000, 30000)),  # beyond PIL's own bomb limit too
        "extreme_aspect": lambda: row(encode(Image.new("RGB", (300, 1)))),
        "problem_too_long": lambda: row(problem="<image>" + "x" * 9000),
    }[kind]()


PARQUET_KINDS = ["bad_image", "missing_field", "no_image", "missing_image_file", "empty_image", "image_too_large",
                 "extreme_aspect", "problem_too_long"]


@pytest.mark.parametrize("kind", PARQUET_KINDS)
def test_parquet_bad_row_is_skipped_or_raises(kind, tmp_path):
    path = write_parquet(tmp_path / "g.parquet", [row(answer="1"), _parquet_case(kind, tmp_path), row(answer="2")])
    prompts, report = load_prompts(path, **PIX)
    assert [p.answer for p in prompts] == ["1", "2"]
    assert [(s.file, s.row, s.kind) for s in report.skipped] == [(path, 1, kind)]
    assert report.counts_by_kind() == {kind: 1} and (report.rows_read, report.rows_ok) == (3, 2)
    with pytest.raises(DataError) as e:
        load_prompts(path, **PIX, strict=True)
    assert (e.value.file, e.value.row, e.value.kind) == (path, 1, kind)
    assert path in str(e.value) and "row 1" in str(e.value) and kind in str(e.value)


def test_parquet_null_answer_and_wrong_column_type(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [row(answer=None), row()])
    _, report = load_prompts(path, **PIX)
    assert [(s.row, s.kind) for s in report.skipped] == [(0, "missing_field")]
    schema = pa.schema([("images", IMAGES_TYPE), ("problem", pa.int64()), ("answer", pa.int64())])
    img = [{"bytes": encode(rgb(56, 56)), "path": None}]
    path = write_parquet(tmp_path / "t.parquet", [{"images": img, "problem": 5, "answer": 4}], schema)
    prompts, report = load_prompts(path, **PIX)
    assert prompts == [] and [(s.row, s.kind) for s in report.skipped] == [(0, "bad_type")]
    path = write_parquet(tmp_path / "i.parquet", [{"images": img, "problem": "<image>Q", "answer": 4}],
                         pa.schema([("images", IMAGES_TYPE), ("problem", pa.string()), ("answer", pa.int64())]))
    assert load_prompts(path, **PIX)[0][0].answer == "4"  # integer answers are written as text


def _jsonl_case(kind, tmp_path):
    """(bad line for an MM-Eureka file) per kind."""
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "images" / "thin.png").write_bytes(encode(Image.new("RGB", (1, 300))))
    (tmp_path / "images" / "bomb.png").write_bytes(png_claiming(12000, 9000))
    two = eureka(as_string=False)
    two["message"][1]["content"].append({"type": "image", "image": "images/a.png"})
    return {
        "bad_json": lambda: b'{"message": "[1, 2", "answer": \xff}',
        "bad_json_message": lambda: {"message": "[{not json", "answer": "1"},
        "bad_type": lambda: "[1, 2, 3]",
        "bad_type_answer": lambda: eureka(answer=[1, 2]),
        "bad_type_message": lambda: {"message": 5, "answer": "1"},
        "missing_field": lambda: {k: v for k, v in eureka().items() if k != "answer"},
        "missing_field_message": lambda: {"answer": "1"},
        "no_image": lambda: eureka(image=None),
        "multi_image": lambda: two,
        "missing_image_file": lambda: eureka("images/missing.png"),
        "empty_image": lambda: eureka("images/empty.png"),
        "bad_image": lambda: eureka("images/broken.png"),
        "image_too_large": lambda: eureka("images/bomb.png"),
        "extreme_aspect": lambda: eureka("images/thin.png"),
        "problem_too_long": lambda: eureka(text="y" * 9000),
    }[kind]()


JSONL_KINDS = ["bad_json", "bad_json_message", "bad_type", "bad_type_answer", "bad_type_message", "missing_field",
               "missing_field_message", "no_image", "multi_image", "missing_image_file", "empty_image", "bad_image",
               "image_too_large", "extreme_aspect", "problem_too_long"]


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode(rgb(112, 112)))
    return tmp_path


@pytest.mark.parametrize("case", JSONL_KINDS)
def test_jsonl_bad_row_is_skipped_or_raises(case, image_dir):
    kind = case.split("_message")[0].split("_answer")[0]
    path = write_jsonl(image_dir / "e.jsonl", [eureka(answer="1"), _jsonl_case(case, image_dir), eureka(answer="2")])
    prompts, report = load_prompts(path, **PIX)
    assert [p.answer for p in prompts] == ["1", "2"]
    assert [(s.file, s.row, s.kind) for s in report.skipped] == [(path, 1, kind)], report.skipped
    with pytest.raises(DataError) as e:
        load_prompts(path, **PIX, strict=True)
    assert (e.value.file, e.value.row, e.value.kind) == (path, 1, kind)
    assert path in str(e.value) and "row 1" in str(e.value)


def test_mixed_file_yields_exactly_the_good_rows_in_order(image_dir, caplog):
    lines = []
    for i in range(30):
        lines.append(eureka(answer=str(i)) if i % 3 == 0 else _jsonl_case(JSONL_KINDS[i % len(JSONL_KINDS)], image_dir))
    path = write_jsonl(image_dir / "mixed.jsonl", lines)
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="core.data"):
        prompts = list(iter_prompts(path, **PIX, report=report))
    assert [p.answer for p in prompts] == [str(i) for i in range(0, 30, 3)]
    assert [p.row for p in prompts] == list(range(0, 30, 3))
    assert [s.row for s in report.skipped] == [i for i in range(30) if i % 3]
    assert (report.rows_read, report.rows_ok, len(report.skipped)) == (30, 10, 20)
    assert sum(report.counts_by_kind().values()) == 20
    assert report.summary().startswith("10/30 rows ok from 1 file(s); 20 skipped (")
    skip_logs = [r for r in caplog.records if "skipped" in r.getMessage() and "row" in r.getMessage()]
    assert len(skip_logs) >= 20 and all(r.levelno == logging.WARNING for r in skip_logs)


def test_skip_logging_is_rate_limited(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 50)
    with caplog.at_level(logging.WARNING, logger="core.data"):
        prompts, report = load_prompts(path, **PIX)
    assert prompts == [] and report.counts_by_kind() == {"bad_json": 50}
    assert len(caplog.records) < 25


def test_unexpected_errors_are_counted_not_raised(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "g.parquet", [row(), row()])

    def boom(*a, **kw):
        raise KeyError("surprise")

    monkeypatch.setattr(data_parquet, "load_image", boom)
    prompts, report = load_prompts(path, **PIX)
    assert prompts == [] and report.counts_by_kind() == {"unexpected": 2}
    with pytest.raises(DataError, match="unexpected"):
        load_prompts(path, **PIX, strict=True)


# ---------------------------------------------------------------------------------------------------
# File-level errors, paths, limit


def test_missing_column_names_the_file_and_column(tmp_path):
    schema = pa.schema([("images", IMAGES_TYPE), ("problem", pa.string())])
    path = write_parquet(tmp_path / "nocol.parquet", [{"images": [], "problem": "x"}], schema)
    for strict in (False, True):
        with pytest.raises(DataError, match="'answer'") as e:
            load_prompts(path, **PIX, strict=strict)
        assert e.value.kind == "missing_column" and path in str(e.value)
    with pytest.raises(DataError, match="'question'"):
        load_prompts(path, **PIX, prompt_key="question")


def test_unreadable_parquet_is_a_file_error(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad_file") as e:
        load_prompts(str(path), **PIX)
    assert str(path) in str(e.value)


def test_missing_paths_raise_file_not_found_naming_them(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_prompts(missing, **PIX)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        iter_prompts([missing], **PIX)  # at the call, not at the first next()
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl"):
        load_prompts(str(tmp_path / "*.jsonl"), **PIX)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir"):
        load_prompts(str(tmp_path / "emptydir"), **PIX)


def test_format_by_extension_or_explicit(image_dir):
    txt = image_dir / "data.txt"
    txt.write_text(json.dumps(eureka()) + "\n")
    with pytest.raises(ValueError, match="fmt="):
        load_prompts(str(txt), **PIX)
    prompts, _ = load_prompts(str(txt), **PIX, fmt="mm_eureka")
    assert len(prompts) == 1
    pq_as_other = write_parquet(image_dir / "g.bin", [row()])
    assert len(load_prompts(pq_as_other, **PIX, fmt="geometry3k")[0]) == 1
    with pytest.raises(ValueError, match="unknown data format"):
        load_prompts(str(txt), **PIX, fmt="csv")


def test_directories_globs_and_limit(image_dir):
    d = image_dir
    write_parquet(d / "b.parquet", [row(answer=f"b{i}") for i in range(3)])
    write_jsonl(d / "a.jsonl", [eureka(answer=f"a{i}") for i in range(2)])
    (d / "README.txt").write_text("not data")
    prompts, report = load_prompts(str(d), **PIX)
    assert [p.answer for p in prompts] == ["a0", "a1", "b0", "b1", "b2"]  # files sorted by name
    assert report.files == [str(d / "a.jsonl"), str(d / "b.parquet")]
    prompts, _ = load_prompts(str(d / "*.parquet"), **PIX)
    assert [p.answer for p in prompts] == ["b0", "b1", "b2"]
    prompts, _ = load_prompts([str(d / "b.parquet"), d / "a.jsonl"], **PIX)
    assert [p.answer for p in prompts] == ["b0", "b1", "b2", "a0", "a1"]
    prompts, report = load_prompts(str(d), **PIX, limit=3)
    assert [p.answer for p in prompts] == ["a0", "a1", "b0"] and report.rows_read == 3
    assert load_prompts(str(d), **PIX, limit=0)[0] == []


def test_limit_counts_good_prompts_only(tmp_path):
    path = write_parquet(tmp_path / "g.parquet", [row(b"junk"), row(answer="1"), row(b""), row(answer="2"), row()])
    prompts, report = load_prompts(path, **PIX, limit=2)
    assert [p.answer for p in prompts] == ["1", "2"] and report.rows_read == 4 and len(report.skipped) == 2


def test_iter_prompts_streams(tmp_path):
    path = write_parquet(tmp_path / "g.parquet", [row(answer=str(i)) for i in range(5)])
    report = DataReport()
    it = iter_prompts(path, **PIX, report=report)
    first = next(it)
    assert first.answer == "0" and report.rows_ok == 1 and report.rows_read == 1
