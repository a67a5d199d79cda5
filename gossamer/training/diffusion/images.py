"""Image grids as PNG files, with no imaging library.

A PNG is a signature, an IHDR chunk, zlib-compressed scanlines in IDAT chunks and an IEND chunk,
each chunk CRC-32-checked; writing one takes a few lines of ``zlib`` and ``struct``, so sample grids
need no Pillow. The decoder reads what common tools write for 8-bit non-interlaced images (all
five scanline filters), which lets tests check a written file and lets ``load_image_folder`` read
PNGs on machines without Pillow.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels, for 8-bit samples
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def make_grid(images: torch.Tensor, nrow: int = 10, padding: int = 1, scale: int = 4) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 array, (H', W') grey or (H', W', 3).

    ``scale`` enlarges every pixel to a scale×scale block (nearest neighbour): 8×8 digits are
    too small to look at otherwise. Padding is black.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError("images must be (N, 1 or 3, H, W)")
    x = images.detach().float().cpu().clamp(-1, 1)
    pix = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = pix.shape
    ncol = max(1, min(nrow, n))
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = pix[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array, (H, W) grey or (H, W, 3) RGB; scanline filter 0 (none)."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError("pixels must be uint8")
    if arr.ndim == 2:
        colour_type = 0
    elif arr.ndim == 3 and arr.shape[2] == 3:
        colour_type = 2
    else:
        raise ValueError("pixels must be (H, W) or (H, W, 3)")
    height, width = arr.shape[:2]
    rows = arr.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` (see ``encode_png``) to ``path``; returns the path."""
    out = Path(path)
    out.write_bytes(encode_png(pixels))
    return out


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 10, padding: int = 1, scale: int = 4
) -> Path:
    """``make_grid`` then ``write_png``: the one call a sampler or the CLI needs."""
    return write_png(path, make_grid(images, nrow=nrow, padding=padding, scale=scale))


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced grey / grey+alpha / RGB / RGBA PNG to a uint8 array.

    Returns (H, W) for grey, else (H, W, channels). Checks the signature and every chunk CRC, so a
    truncated or corrupted file raises ``ValueError`` rather than decoding to garbage.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if crc != zlib.crc32(kind + payload) & 0xFFFFFFFF:
            raise ValueError(f"CRC mismatch in {kind!r} chunk")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos = end
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in _CHANNELS or interlace != 0:
        raise ValueError("only 8-bit, non-interlaced grey/RGB(A) PNGs are supported")
    bpp = _CHANNELS[colour_type]
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError("PNG image data has the wrong size")
    raw = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind in (1, 3, 4):  # these depend on the pixel to the left: sequential
            cur = np.zeros(stride, np.int32)
            for i in range(stride):
                left = cur[i - bpp] if i >= bpp else 0
                up, up_left = prev[i], (prev[i - bpp] if i >= bpp else 0)
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up) >> 1
                else:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                cur[i] = (line[i] + pred) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
        out[y] = cur
        prev = cur
    pixels = out.astype(np.uint8)
    return pixels if bpp == 1 else pixels.reshape(height, width, bpp)
