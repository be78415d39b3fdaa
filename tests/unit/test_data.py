import io
import json
import logging
import pickle
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from core import data
from core.data import DataError, DataReport, fit_image, iter_prompts, load_prompts

PIX = dict(min_pixels=56 * 56, max_pixels=224 * 224)  # 112x112 is a fixed point of smart_resize here

IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
SCHEMA = pa.schema([("images", IMAGES_TYPE), ("problem", pa.string()), ("answer", pa.string()),
                    ("solution", pa.string())])


def rgb(h, w, seed=0):  # [h, w, 3] uint8 noise: any resampling would change it
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(image, fmt="PNG", **kw) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width, height) -> bytes:
    """A PNG whose header claims width x height (the pixel data is 2x2): a cheap decompression bomb."""
    raw = bytearray(encode(Image.new("RGB", (2, 2))))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


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


def is_fixed(h, w, min_pixels, max_pixels, factor=28):
    return smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) == (h, w)


# ---------------------------------------------------------------------------------------------------
# fit_image


@pytest.mark.parametrize("size,pixels", [
    ((37, 91), PIX),
    ((91, 37), PIX),
    ((500, 20), PIX),
    ((1, 1), PIX),
    ((5000, 28), PIX),
    ((112, 113), PIX),
    ((3000, 4000), dict(min_pixels=28 * 28, max_pixels=28 * 28 * 20)),
    ((640, 480), dict(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)),
])
def test_fit_image_gives_a_smart_resize_fixed_point(size, pixels):
    w, h = size
    out = fit_image(Image.new("RGB", (w, h), (10, 20, 30)), **pixels)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.owndata
    H, W = out.shape[:2]
    assert H % 28 == 0 and W % 28 == 0
    assert is_fixed(H, W, **pixels)
    assert pixels["min_pixels"] <= H * W <= pixels["max_pixels"]
    assert (H, W) == data.fitted_size(h, w, **pixels)
    assert np.all(out == (10, 20, 30))  # a flat colour survives the bicubic resize


def test_fit_image_keeps_a_valid_size_pixel_identical():
    src = rgb(112, 168)
    out = fit_image(Image.fromarray(src), **PIX)
    assert np.array_equal(out, src)


def test_fit_image_other_factor():
    out = fit_image(Image.new("RGB", (100, 70)), min_pixels=32 * 32, max_pixels=64 * 64 * 4, factor=32)
    assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0
    assert is_fixed(*out.shape[:2], 32 * 32, 64 * 64 * 4, factor=32)


def test_fit_image_rejects_bad_pixel_settings():
    with pytest.raises(ValueError, match="min_pixels"):
        fit_image(Image.new("RGB", (56, 56)), min_pixels=100, max_pixels=50)


def _png_roundtrip(image, **kw):
    return Image.open(io.BytesIO(encode(image, **kw)))


def _modes():
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[:, :56] = (255, 0, 0, 0)  # fully transparent red: must come out white, not red or black
    rgba[:, 56:] = (0, 0, 255, 255)
    la = np.zeros((112, 112, 2), np.uint8)
    la[:, :56] = (0, 0)
    la[:, 56:] = (40, 255)
    palette = Image.fromarray(np.where(np.arange(112)[None, :, None] < 56, (200, 10, 10), (10, 200, 10))
                              .astype(np.uint8).repeat(112, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    p_transparent = palette.copy()
    left_index = p_transparent.getpixel((0, 0))
    bits = np.indices((112, 112)).sum(0) % 2 == 0
    return {
        "1": (Image.fromarray(bits), lambda a: set(np.unique(a)) == {0, 255} and np.array_equal(a[..., 0] == 255, bits)),
        "L": (Image.new("L", (112, 112), 77), lambda a: np.all(a == 77)),
        "LA": (Image.fromarray(la, mode="LA"), lambda a: np.all(a[:, :56] == 255) and np.all(a[:, 56:] == 40)),
        "RGBA": (Image.fromarray(rgba, mode="RGBA"),
                 lambda a: np.all(a[:, :56] == 255) and np.all(a[:, 56:] == (0, 0, 255))),
        "RGBA half alpha": (Image.new("RGBA", (112, 112), (0, 0, 0, 128)), lambda a: np.all(np.abs(a.astype(int) - 127) <= 1)),
        "P": (_png_roundtrip(palette), lambda a: np.all(a[:, :56] == (200, 10, 10)) and np.all(a[:, 56:] == (10, 200, 10))),
        "P transparent": (_png_roundtrip(p_transparent, transparency=left_index),
                          lambda a: np.all(a[:, :56] == 255) and np.all(a[:, 56:] == (10, 200, 10))),
        "RGB tRNS": (_png_roundtrip(Image.new("RGB", (112, 112), (1, 2, 3)), transparency=(1, 2, 3)),
                     lambda a: np.all(a == 255)),
        "CMYK": (Image.new("CMYK", (112, 112), (255, 0, 0, 0)), lambda a: np.all(a == (0, 255, 255))),
        "CMYK jpeg": (Image.open(io.BytesIO(encode(Image.new("CMYK", (112, 112), (0, 0, 0, 0)), "JPEG", quality=95))),
                      lambda a: np.all(a >= 250)),
        "I": (Image.fromarray(np.full((112, 112), 200, np.int32), mode="I"), lambda a: np.all(a == 200)),
        "F [0,1]": (Image.fromarray(np.full((112, 112), 0.5, np.float32), mode="F"), lambda a: np.all(a == 128)),
        "F wide": (Image.fromarray(np.tile(np.linspace(-1000, 1000, 112, dtype=np.float32), (112, 1)), mode="F"),
                   lambda a: a[0, 0, 0] == 0 and a[0, -1, 0] == 255),
    }


MODES = _modes()


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_decodes_to_rgb_uint8(name):
    image, check = MODES[name]
    out = fit_image(image, **PIX)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert check(out), (name, np.unique(out.reshape(-1, 3), axis=0)[:8])


def test_16_bit_gradient_keeps_its_range():
    grad = np.tile(np.linspace(0, 65535, 112).round().astype(np.uint16), (112, 1))  # [112, 112] uint16
    image = Image.open(io.BytesIO(encode(Image.fromarray(grad))))
    assert image.mode.startswith("I")
    out = fit_image(image, **PIX)[..., 0]
    assert out.min() == 0 and out.max() == 255  # not clipped to white, not squashed
    assert np.all(np.diff(out[0].astype(int)) >= 0)
    assert len(np.unique(out)) > 100
    np.testing.assert_allclose(out[0], grad[0] / 257.0, atol=0.51)


def test_12_bit_data_in_16_bits_scales_by_its_bit_depth():
    grad = np.tile(np.linspace(0, 4095, 112).round().astype(np.uint16), (112, 1))
    out = fit_image(Image.fromarray(grad), **PIX)[..., 0]
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out[0], grad[0].astype(float) * 255 / 4095, atol=0.51)


def test_exif_orientation_is_applied():
    src = rgb(56, 112)  # [56, 112, 3]: landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image = Image.open(io.BytesIO(encode(src, exif=exif.tobytes())))
    out = fit_image(image, **PIX)
    assert out.shape == (112, 56, 3)
    assert np.array_equal(out, np.array(Image.fromarray(src).transpose(Image.Transpose.ROTATE_270)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test's own Image.open
def test_huge_image_is_refused_before_decoding():
    with pytest.raises(DataError) as e:
        fit_image(Image.open(io.BytesIO(png_claiming(12000, 9000))), **PIX)
    assert e.value.kind == "image_too_large" and "12000x9000" in str(e.value)
    with pytest.raises(DataError, match="image_too_large"):
        fit_image(Image.new("L", (300, 300)), **PIX, max_image_pixels=300 * 300 - 1)


def test_large_side_is_capped_cheaply_first(monkeypatch):
    calls = []
    real_reduce = Image.Image.reduce

    def spy(self, factor, box=None):
        calls.append((self.size, factor))
        return real_reduce(self, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", spy)
    src = np.tile(np.linspace(0, 255, 1200).astype(np.uint8), (900, 1))  # a smooth [900, 1200] ramp
    out = fit_image(Image.fromarray(src).convert("RGB"), **PIX, max_side=300)
    assert calls == [((1200, 900), 4)]  # down to 300x225 by a box filter before the bicubic resize
    assert is_fixed(*out.shape[:2], **PIX)
    direct = np.array(Image.fromarray(src).resize(out.shape[1::-1], Image.Resampling.BICUBIC))
    assert np.abs(out[..., 0].astype(int) - direct).mean() < 2

    calls.clear()  # a JPEG is decoded at reduced scale (draft) instead
    jpeg = Image.open(io.BytesIO(encode(Image.fromarray(src).convert("RGB"), "JPEG", quality=95)))
    out = fit_image(jpeg, **PIX, max_side=300)
    assert is_fixed(*out.shape[:2], **PIX) and jpeg.size == (300, 225) and calls == []


def test_cap_never_goes_below_the_target_size():
    out = fit_image(Image.new("RGB", (448, 448)), **PIX, max_side=64)
    assert out.shape == (224, 224, 3)


def test_zero_size_and_extreme_aspect_and_corrupt_raise_data_error():
    with pytest.raises(DataError, match="empty_image"):
        fit_image(Image.new("RGB", (0, 5)), **PIX)
    with pytest.raises(DataError, match="extreme_aspect"):
        fit_image(Image.new("RGB", (1, 300)), **PIX)
    truncated = encode(rgb(112, 112))[:200]
    with pytest.raises(DataError, match="bad_image"):
        fit_image(Image.open(io.BytesIO(truncated)), **PIX)


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

    monkeypatch.setattr(data, "_load_image", boom)
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


def test_clean_answer():
    assert data.clean_answer("<answer> 42 </answer>") == "42"
    assert data.clean_answer("\\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert data.clean_answer("\\boxed{1} + \\boxed{2}") == "\\boxed{1} + \\boxed{2}"  # not one outer wrapper
    assert data.clean_answer(2.5) == "2.5" and data.clean_answer(7) == "7"
    for bad, kind in [(None, "missing_field"), ("  ", "missing_field"), ("<answer></answer>", "missing_field"),
                      (True, "bad_type"), ({"a": 1}, "bad_type")]:
        with pytest.raises(DataError) as e:
            data.clean_answer(bad)
        assert e.value.kind == kind


def test_data_error_pickles_and_is_a_value_error():
    err = DataError("bad_image", "broken", "f.parquet", 3)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError)
    assert (again.kind, again.file, again.row, str(again)) == ("bad_image", "f.parquet", 3, str(err))
    assert str(err) == "f.parquet: row 3: bad_image: broken"
    assert set(data.SKIP_KINDS) >= {"bad_json", "bad_type", "missing_field", "no_image", "missing_image_file",
                                    "empty_image", "bad_image", "image_too_large", "problem_too_long"}
