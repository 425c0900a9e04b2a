"""Minimal PNG plots with numpy and zlib only (no plotting dependency).

The images carry no text: the numbers they show are in the markdown summary next to them.
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np

WHITE, GREY, BLACK = (255, 255, 255), (200, 200, 200), (0, 0, 0)
LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def write_png(path: str, rgb: np.ndarray) -> None:
    """An 8-bit RGB image [height, width, 3]."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError("write_png takes RGB images")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # Each row starts with filter type 0 (none).
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def accuracy_colour(v: float) -> tuple:
    """Red (0) through yellow (0.5) to green (1), as NIAH heatmaps are usually drawn."""
    v = min(max(v, 0.0), 1.0)
    if v < 0.5:
        return (220, int(60 + 2 * v * 160), 60)
    return (int(220 - 2 * (v - 0.5) * 170), 220 - int(2 * (v - 0.5) * 40), 60)


def heatmap_image(values: np.ndarray, cell: int = 32, border: int = 1) -> np.ndarray:
    """values [rows, cols] in [0, 1] (NaN: no data, grey) -> an RGB grid of ``cell``-pixel cells.

    For NIAH: rows are depths (top = 0, the start of the context), columns are lengths.
    """
    rows, cols = values.shape
    img = np.full((rows * cell + border, cols * cell + border, 3), BLACK, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            colour = GREY if np.isnan(v) else accuracy_colour(float(v))
            img[r * cell + border:(r + 1) * cell, c * cell + border:(c + 1) * cell] = colour
    return img


def line_plot_image(series: Sequence[Sequence[float]], width: int = 480, height: int = 240,
                    margin: int = 10) -> np.ndarray:
    """Curves of equal x spacing (e.g. loss per position bucket), scaled to a shared y range,
    on a white canvas with a frame; colours in ``LINE_COLOURS`` order."""
    img = np.full((height, width, 3), WHITE, dtype=np.uint8)
    img[margin, margin:width - margin] = img[height - margin - 1, margin:width - margin] = GREY
    img[margin:height - margin, margin] = img[margin:height - margin, width - margin - 1] = GREY
    finite = [y for s in series for y in s if np.isfinite(y)]
    if not finite:
        return img
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    for i, ys in enumerate(series):
        ys = np.asarray(ys, dtype=float)
        if len(ys) == 0:
            continue
        xs = np.linspace(margin + 2, width - margin - 3, max(len(ys), 2))[:len(ys)]
        py = height - margin - 3 - (ys - lo) / span * (height - 2 * margin - 5)
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        points = list(zip(xs, py))
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
            if not (np.isfinite(y0) and np.isfinite(y1)):
                continue
            steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0.0, 1.0, steps):
                x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                img[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = colour
    return img
