"""A minimal PNG encoder and a colour scale for the heatmap (no imaging library needed)."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

# Colour stops of a perceptually ordered dark-blue → teal → yellow scale (our own picks).
_STOPS = np.array(
    [[20, 24, 82], [38, 88, 150], [30, 150, 140], [110, 196, 90], [246, 226, 60]],
    dtype=np.float64,
)
NONFINITE_RGB = (220, 30, 30)
ZERO_RGB = (0, 0, 0)
MISSING_RGB = (235, 235, 235)


def colour_scale(t: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB rows along the scale's stops."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (len(_STOPS) - 1)
    i = np.minimum(t.astype(np.int64), len(_STOPS) - 2)
    f = (t - i)[..., None]
    return np.round(_STOPS[i] * (1 - f) + _STOPS[i + 1] * f).astype(np.uint8)


def scale_css(t: float) -> str:
    """The scale's colour at ``t`` as a CSS ``rgb()``."""
    r, g, b = colour_scale(np.array([t]))[0]
    return f"rgb({r},{g},{b})"


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(height, width, 3)`` uint8 array as a PNG file."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape[:2]:
        raise ValueError(f"rgb must have shape (height, width, 3), got {rgb.shape}")
    height, width = rgb.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def data_uri(png: bytes) -> str:
    """A ``data:`` URI for inline embedding."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
