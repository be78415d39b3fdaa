"""Images of a data set: decoded to RGB and fitted once to a size the Qwen2-VL processor keeps.

`fit_image` decodes (transparency over white, 16-bit and float data scaled to 8 bits, EXIF
orientation applied), caps against decompression bombs, downscales huge images cheaply, then resizes
once (PIL bicubic) to a size that `smart_resize` maps to itself, so the processor never resizes again
and every side (engines, adversary, learner) sees exactly these pixels. `load_image` turns a row's
image reference (bytes, a path inside the image folder, a `file://` or `data:` URI) into such an
array. Problems raise `DataError` with a SKIP_KINDS kind.

`smart_resize` is imported here once for the project (the adversary imports it from this module).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from core.data_rows import DataError

try:  # the PIL image-processor module imports without torchvision (see STACK-NOTES.md)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover - older transformers layout
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


# Beyond this many pixels an image is refused before it is decoded. PIL's own bomb check
# (Image.MAX_IMAGE_PIXELS) still refuses above twice its limit (~179 MP) at open time.
MAX_IMAGE_PIXELS = 100_000_000

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
    check_pixels(min_pixels, max_pixels, factor)
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


def check_pixels(min_pixels: int, max_pixels: int, factor: int) -> None:
    """ValueError (a config problem, not a bad row) unless the limits can hold an image at all."""
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


def load_image(data: Any, path: Any, base: str, fit: dict[str, Any]) -> np.ndarray:  # -> [H, W, 3] uint8
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
