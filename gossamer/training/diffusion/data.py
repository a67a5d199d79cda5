"""Image data for decentralized diffusion: the bundled digits set and a user's image folder.

Every image tensor in this package is float32, shaped (N, C, H, W), scaled to [-1, 1]: the flow
path starts from standard normal noise, so data of unit-ish scale keeps the velocity targets well
conditioned. The digits set ships inside scikit-learn (no download), which makes it the default for
tests, benchmarks and demos on machines that cannot reach the internet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGITS_SHAPE = (1, 8, 8)
DIGITS_HOLDOUT = 360
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """A tensor container: images (N, C, H, W) in [-1, 1] and optional integer labels (N,).

    Deliberately not a torch ``Dataset``: training samples whole random batches by index, which is
    one ``index_select`` here instead of a collate loop over single items.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,) and match the number of images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> ImageSet:
        """The images (and labels) at ``index``, in that order."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(self.images[idx], labels)


def load_digits_split(n_holdout: int = DIGITS_HOLDOUT, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 handwritten digits (8×8 grey) as (train, held-out).

    The split is a seeded permutation, so every node and every benchmark run holds out the same
    images; the held-out part is only ever used to score samples (Fréchet distance, classifier).
    Pixel values 0..16 map linearly to [-1, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32)  # (N, 8, 8), values 0..16
    images = torch.from_numpy(pixels / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = images.shape[0]
    if not 0 < n_holdout < n:
        raise ValueError(f"n_holdout must be in 1..{n - 1}")
    order = np.random.default_rng(seed).permutation(n)
    held, train = order[:n_holdout], order[n_holdout:]
    full = ImageSet(images.contiguous(), labels)
    return full.subset(np.sort(train)), full.subset(np.sort(held))


def load_image_folder(
    path: str | Path,
    size: int | tuple[int, int],
    mode: str = "L",
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> ImageSet:
    """Every image file directly under ``path`` (sorted by name), as grey (``"L"``) or ``"RGB"``.

    Files are resized to ``size`` (an int means square) with bicubic resampling. Sorting by name
    makes the tensor order — and therefore the partition assignment of each file — the same on
    every node holding the same folder. PNG and JPEG need Pillow (``pip install pillow``); without
    it only 8-bit PNGs already of the requested size are read, by the small decoder in images.py.
    Labels are ``None``: folders carry no classes.
    """
    from gossamer.training.diffusion.images import decode_png

    if mode not in ("L", "RGB"):
        raise ValueError("mode must be 'L' or 'RGB'")
    height, width = (size, size) if isinstance(size, int) else size
    folder = Path(path)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in tuple(suffixes)
    )
    if not files:
        raise FileNotFoundError(f"no images with suffixes {tuple(suffixes)} in {folder}")
    try:
        from PIL import Image
    except ImportError:
        Image = None

    arrays = []
    for file in files:
        if Image is not None:
            with Image.open(file) as img:
                img = img.convert(mode).resize((width, height), Image.Resampling.BICUBIC)
                arr = np.asarray(img, dtype=np.uint8)
        elif file.suffix.lower() == ".png":
            arr = _to_mode(decode_png(file.read_bytes()), mode)
            if arr.shape[:2] != (height, width):
                raise RuntimeError(f"{file} is {arr.shape[:2]}, resizing needs Pillow")
        else:
            raise RuntimeError(f"reading {file.suffix} files needs Pillow: pip install pillow")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arrays.append(arr.transpose(2, 0, 1))
    stacked = np.stack(arrays).astype(np.float32)
    return ImageSet(torch.from_numpy(stacked / 127.5 - 1.0))


def _to_mode(arr: np.ndarray, mode: str) -> np.ndarray:
    """Convert a decoded (H, W) or (H, W, C) uint8 array to grey (ITU-R 601 luma) or RGB."""
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[:, :, :-1] if arr.shape[2] == 4 else arr[:, :, 0]
    if mode == "L":
        if arr.ndim == 3:
            luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            arr = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
        return arr
    return arr if arr.ndim == 3 else np.repeat(arr[:, :, None], 3, axis=2)
