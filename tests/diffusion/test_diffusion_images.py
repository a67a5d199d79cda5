"""PNG grids (written without Pillow), image folders, and the sample-quality metrics."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from gossamer.training.diffusion import (
    classifier_accuracy,
    classifier_features,
    confident_rate,
    decode_png,
    encode_png,
    frechet_distance,
    load_digits_split,
    load_image_folder,
    make_grid,
    sample_quality,
    save_image_grid,
    train_classifier,
    write_png,
)
from gossamer.training.diffusion.images import PNG_SIGNATURE


def chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        out.append((kind, payload, crc))
        pos += 12 + length
    return out


@pytest.mark.parametrize("shape, colour_type", [((5, 7), 0), ((3, 4, 3), 2)])
def test_png_has_signature_ihdr_valid_crcs_and_decodes(shape, colour_type):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    parts = chunks(data)
    assert [kind for kind, _, _ in parts] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", parts[0][1])
    assert (width, height) == (shape[1], shape[0])
    assert (depth, ctype, comp, filt, interlace) == (8, colour_type, 0, 0, 0)
    assert all(crc == zlib.crc32(kind + payload) & 0xFFFFFFFF for kind, payload, crc in parts)
    assert np.array_equal(decode_png(data), pixels)


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def test_decoder_undoes_every_scanline_filter():
    """Encode rows with filters 0-4 (as other tools write them); the decoder must invert each."""
    rng = np.random.default_rng(1)
    height, width, bpp = 5, 4, 3
    pixels = rng.integers(0, 256, (height, width, bpp), dtype=np.uint8)
    rows = pixels.reshape(height, -1).astype(int)
    raw = bytearray()
    for y in range(height):
        kind, prev = y % 5, rows[y - 1] if y else np.zeros(width * bpp, int)
        raw.append(kind)
        for i, value in enumerate(rows[y]):
            left = rows[y][i - bpp] if i >= bpp else 0
            up_left = prev[i - bpp] if i >= bpp else 0
            pred = [0, left, prev[i], (left + prev[i]) // 2, paeth(left, prev[i], up_left)][kind]
            raw.append((value - pred) % 256)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    data = PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw)))
    assert np.array_equal(decode_png(data + chunk(b"IEND", b"")), pixels)


def test_corrupt_pngs_are_refused():
    data = bytearray(encode_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(ValueError):
        decode_png(b"GIF89a" + bytes(data[6:]))
    data[20] ^= 0xFF  # inside IHDR: the CRC no longer matches
    with pytest.raises(ValueError):
        decode_png(bytes(data))
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.float32))


def test_grid_layout_and_file(tmp_path):
    images = torch.linspace(-1, 1, 12).reshape(12, 1, 1, 1).expand(12, 1, 3, 2)
    grid = make_grid(images, nrow=5, padding=1, scale=2)
    assert grid.shape == (2 * (3 * 4 + 1), 2 * (5 * 3 + 1))
    assert grid[2, 2] == 0 and grid[-1, -1] == 0  # first image is −1 (black); padding is black
    assert grid[2 + 2 * 4, 2 + 2 * 3] == round((images[6, 0, 0, 0].item() + 1) * 127.5)
    rgb = make_grid(torch.zeros(2, 3, 4, 4), nrow=2, scale=1)
    assert rgb.shape == (6, 11, 3)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=5, scale=2)
    assert np.array_equal(decode_png(path.read_bytes()), grid)


def test_image_folder_loads_sorted_grey_and_rgb(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    for i, name in enumerate(["b.png", "a.png", "c.png"]):
        write_png(tmp_path / name, pixels[i])
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = load_image_folder(tmp_path, 6, mode="RGB")
    assert rgb.images.shape == (3, 3, 6, 6) and rgb.labels is None
    expected = pixels[[1, 0, 2]].transpose(0, 3, 1, 2) / 127.5 - 1  # sorted by file name
    assert np.allclose(rgb.images.numpy(), expected, atol=1e-6)
    grey = load_image_folder(tmp_path, (6, 6), mode="L")
    assert grey.images.shape == (3, 1, 6, 6)
    assert float(grey.images.min()) >= -1 and float(grey.images.max()) <= 1
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path, 6, suffixes=(".jpg",))


def test_frechet_distance_against_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4 I) in 3 dims: |m|^2 + 3 (1 + 4 - 2·2) = |m|^2 + 3
    b = 2 * rng.standard_normal((4000, 3)) + np.array([1.0, 0.0, 2.0])
    assert frechet_distance(a, b) == pytest.approx(5 + 3, rel=0.06)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    x, y = rng.standard_normal((300, 6)), rng.standard_normal((300, 6)) @ rng.random((6, 6))
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(
        ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real
    )
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_digit_classifier_metrics_separate_real_from_noise():
    train, held = load_digits_split()
    clf = train_classifier(train, steps=600, seed=0)
    assert classifier_accuracy(clf, held) > 0.93
    assert classifier_features(clf, held.images[:5]).shape == (5, 128)
    real = sample_quality(clf, train.images[:360], held.images)
    noise = sample_quality(clf, torch.randn(360, 1, 8, 8), held.images)
    assert real["fd"] < noise["fd"] / 5
    assert real["confident_rate"] > 0.8 > noise["confident_rate"]
    assert confident_rate(clf, held.images, threshold=0.0) == 1.0
    again = train_classifier(train, steps=600, seed=0)
    assert torch.equal(again(held.images), clf(held.images))
