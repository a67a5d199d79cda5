"""Sample quality for the digits benchmark: a digit classifier, its features, Fréchet distance.

There is no Inception network for 8×8 digits, so the benchmark trains its own small classifier on
the training split (held-out accuracy ≈ 97%, like the calibration's) and measures the Fréchet
distance (FD) between generated samples and the held-out images in the classifier's penultimate
layer — the FID recipe with a domain-appropriate feature extractor. The classifier's confident
rate (max probability > 0.9) is a second, cruder signal: blurry or chimeric digits are not
confidently any class.

Everything is seeded, so two runs on one machine report the same numbers for the same samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gossamer.training.diffusion.data import ImageSet


class DigitClassifier(nn.Module):
    """MLP on the flattened image: ``features`` is the 128-wide penultimate layer."""

    def __init__(self, image_shape: tuple[int, int, int] = (1, 8, 8), classes: int = 10) -> None:
        super().__init__()
        d = int(np.prod(image_shape))
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    train: ImageSet,
    steps: int = 3000,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    num_threads: int | None = 1,
) -> DigitClassifier:
    """Train the feature classifier on labelled images; light noise augmentation.

    The Gaussian input noise (σ = 0.1) keeps the features smooth around the data, so samples that
    are slightly off the data manifold still land near their digit rather than anywhere.
    """
    if train.labels is None:
        raise ValueError("the classifier needs labels")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    classes = int(train.labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(train.image_shape, classes)
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-3)
        clf.train()
        for _ in range(steps):
            idx = torch.randint(len(train), (batch,), generator=gen)
            x = train.images[idx]
            x = x + 0.1 * torch.randn(x.shape, generator=gen)
            loss = nn.functional.cross_entropy(clf(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()


@torch.no_grad()
def classifier_accuracy(clf: DigitClassifier, data: ImageSet) -> float:
    """Fraction of ``data`` classified correctly."""
    if data.labels is None:
        raise ValueError("accuracy needs labels")
    return float((clf(data.images).argmax(1) == data.labels).float().mean())


@torch.no_grad()
def classifier_features(clf: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    """(N, 128) float64 penultimate-layer features."""
    return clf.features(images.float()).double().numpy()


@torch.no_grad()
def confident_rate(clf: DigitClassifier, images: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of images whose top class probability exceeds ``threshold``."""
    probs = torch.softmax(clf(images.float()), dim=1)
    return float((probs.max(1).values > threshold).float().mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) between two feature sets (N, D).

    tr((Σa Σb)^½) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix Σa^½ Σb Σa^½ — the same quantity as scipy's ``sqrtm`` route, without scipy and without
    complex round-off.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_a)
    root_a = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    middle = root_a @ cov_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def sample_quality(
    clf: DigitClassifier, samples: torch.Tensor, reference: torch.Tensor
) -> dict[str, float]:
    """FD of ``samples`` (clamped to the valid [-1, 1]) against ``reference``; confident rate."""
    samples = samples.clamp(-1, 1)
    fd = frechet_distance(classifier_features(clf, samples), classifier_features(clf, reference))
    return {"fd": fd, "confident_rate": confident_rate(clf, samples)}
