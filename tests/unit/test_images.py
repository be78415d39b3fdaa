"""core/images.py: every image mode decodes to RGB uint8 at a size the processor keeps, bombs are refused."""

import io

import numpy as np
import pytest
from image_bytes import encode, png_claiming, rgb
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from core import images
from core.data_rows import DataError
from core.images import fit_image

PIX = dict(min_pixels=56 * 56, max_pixels=224 * 224)  # 112x112 is a fixed point of smart_resize here


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
    assert (H, W) == images.fitted_size(h, w, **pixels)
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
