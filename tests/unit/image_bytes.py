"""Image bytes for the data tests: noise images, encoded files, a PNG that lies about its size."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


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
