"""scikit-learn's 8x8 handwritten digits as a small stand-in for the paper's vision tasks, with environments.

The digits ship inside scikit-learn, so they need no download: 1,797 grey images of the digits 0-9. This module
holds

- :func:`load_digits_split`: a stratified train/test split as float tensors (N, 1, 8, 8) in [0, 1];
- :data:`CORRUPTIONS` and :func:`corrupt`: three image corruptions (Gaussian noise, blur, an occluding patch);
- :func:`make_environment_split`: every image put in ONE of the three corruption environments, so the data
  carries an environment id to route on, as the paper's speech task routes on the acoustic scene
  (arXiv 2601.22141, §1.2: "one subset per acoustic scene").

Everything is deterministic given the seed: the split uses scikit-learn's ``random_state`` and the corruptions and
environment assignment use their own ``torch.Generator`` (the global torch RNG is never touched).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BLUR_SIGMA",
    "CORRUPTIONS",
    "DigitsSplit",
    "EnvironmentSplit",
    "NOISE_SIGMA",
    "OCCLUSION_FILL",
    "OCCLUSION_SIZE",
    "corrupt",
    "load_digits_split",
    "make_environment_split",
]

#: The environments, in environment-id order: id k is corrupted with ``CORRUPTIONS[k]``.
CORRUPTIONS = ("noise", "blur", "occlusion")

#: Standard deviation of the additive Gaussian noise, on the [0, 1] pixel scale. At 0.3 the noise is as strong as
#: a faint stroke (digit pixels sit mostly at 0 or near 1), so it hides detail without erasing the digit.
NOISE_SIGMA = 0.3

#: Standard deviation, in pixels, of the 3x3 Gaussian blur kernel. On 8x8 images one pixel of blur already merges
#: the strokes of 0/8/9 and of 1/7; a wider kernel would not fit a 3x3 window anyway.
BLUR_SIGMA = 1.0

#: Side of the square occluding patch, in pixels: 3x3 hides 9 of 64 pixels (14 %), often a whole stroke end.
OCCLUSION_SIZE = 3

#: Value written into the occluding patch. 1.0 (full ink) rather than 0.0: the digits' background is already 0,
#: so a 0-patch over background would change nothing and the environment would not always be visible.
OCCLUSION_FILL = 1.0

# sklearn's digits hold integer intensities 0..16.
_DIGITS_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """A train/test split of the digits.

    Attributes:
        x_train: images (N_train, 1, 8, 8) float32 in [0, 1].
        y_train: class labels (N_train,) int64 in [0, 10).
        x_test: images (N_test, 1, 8, 8) float32 in [0, 1].
        y_test: class labels (N_test,) int64 in [0, 10).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class EnvironmentSplit:
    """A digits split in which every image belongs to one corruption environment.

    Attributes:
        x_train: corrupted images (N_train, 1, 8, 8) float32 in [0, 1].
        y_train: class labels (N_train,) int64.
        env_train: environment ids (N_train,) int64 in [0, 3); id k means ``environments[k]``.
        x_test: corrupted images (N_test, 1, 8, 8) float32 in [0, 1].
        y_test: class labels (N_test,) int64.
        env_test: environment ids (N_test,) int64 in [0, 3).
        environments: the environment names, :data:`CORRUPTIONS` (ready for ``rtl.routers.EnvironmentRouter``).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    env_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    env_test: torch.Tensor
    environments: tuple[str, ...] = CORRUPTIONS


def _check_seed(seed: Any) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Load scikit-learn's digits and split them, stratified by class.

    Args:
        test_fraction: share of the 1,797 images put in the test set, in (0, 1).
        seed: ``random_state`` of :func:`sklearn.model_selection.train_test_split`; a non-negative int.

    Returns:
        :class:`DigitsSplit` with x_train (N_train, 1, 8, 8) and x_test (N_test, 1, 8, 8) float32 in [0, 1]
        (the 0..16 intensities divided by 16) and labels y_train (N_train,), y_test (N_test,) int64. Each class
        keeps its share of images in both parts.

    Raises:
        ValueError: test_fraction outside (0, 1), or a negative or non-int seed.

    Example:
        >>> split = load_digits_split(test_fraction=0.25, seed=0)
        >>> split.x_train.shape, split.x_test.shape
        (torch.Size([1347, 1, 8, 8]), torch.Size([450, 1, 8, 8]))
    """
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0.0 < float(test_fraction) < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    seed = _check_seed(seed)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).div_(_DIGITS_MAX).unsqueeze(1)
    y = torch.from_numpy(digits.target).to(torch.int64)
    index = torch.arange(len(y)).numpy()
    train_index, test_index = train_test_split(
        index, test_size=float(test_fraction), random_state=seed, stratify=y.numpy()
    )
    train_index = torch.from_numpy(train_index)
    test_index = torch.from_numpy(test_index)
    return DigitsSplit(
        x_train=x[train_index].contiguous(),
        y_train=y[train_index].contiguous(),
        x_test=x[test_index].contiguous(),
        y_test=y[test_index].contiguous(),
    )


def _blur_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed 3x3 Gaussian kernel (1, 1, 3, 3), normalised to sum 1."""
    taps = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-(taps**2) / (2.0 * BLUR_SIGMA**2))
    kernel = torch.outer(g, g)
    kernel = kernel / kernel.sum()
    return kernel.view(1, 1, 3, 3).to(dtype=dtype, device=device)


def corrupt(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Corrupt a batch of digit images with one of :data:`CORRUPTIONS`.

    - ``"noise"``: add Gaussian noise of standard deviation :data:`NOISE_SIGMA`, then clip to [0, 1];
    - ``"blur"``: convolve with a fixed 3x3 Gaussian kernel (sigma :data:`BLUR_SIGMA` pixels), replicate padding
      so the border does not darken; no randomness;
    - ``"occlusion"``: set one :data:`OCCLUSION_SIZE` x :data:`OCCLUSION_SIZE` patch per image, at a uniformly
      drawn position fully inside the image, to :data:`OCCLUSION_FILL`.

    The random draws come from a ``torch.Generator`` seeded from (seed, kind), so the same x, kind and seed always
    give the same result and different kinds never share a stream. The input is not modified.

    Args:
        x: images (N, 1, 8, 8), floating point, values in [0, 1]; any device (draws are made on the CPU).
        kind: one of :data:`CORRUPTIONS`.
        seed: a non-negative int.

    Returns:
        Corrupted images (N, 1, 8, 8), same dtype and device as x, values in [0, 1].

    Raises:
        ValueError: an unknown kind, a negative seed, or x not of shape (N, 1, 8, 8).
        TypeError: x not a floating-point tensor.

    Example:
        >>> split = load_digits_split()
        >>> noisy = corrupt(split.x_test, "noise", seed=0)
        >>> noisy.shape == split.x_test.shape
        True
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    seed = _check_seed(seed)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"x must have shape (N, 1, 8, 8), got {tuple(x.shape)}")
    kind_id = CORRUPTIONS.index(kind)
    # seed * len + kind is one-to-one on (seed, kind), so no two (seed, kind) pairs share a random stream.
    generator = torch.Generator().manual_seed(seed * len(CORRUPTIONS) + kind_id)
    n = x.shape[0]
    if kind == "noise":
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        return (x + NOISE_SIGMA * noise.to(dtype=x.dtype, device=x.device)).clamp_(0.0, 1.0)
    if kind == "blur":
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, _blur_kernel(x.dtype, x.device)).clamp_(0.0, 1.0)
    # occlusion: top-left corners so that the whole patch lies inside the 8x8 image.
    corners = torch.randint(0, 8 - OCCLUSION_SIZE + 1, (n, 2), generator=generator)
    offsets = torch.arange(8)
    rows = (offsets.view(1, 8) >= corners[:, :1]) & (offsets.view(1, 8) < corners[:, :1] + OCCLUSION_SIZE)
    cols = (offsets.view(1, 8) >= corners[:, 1:]) & (offsets.view(1, 8) < corners[:, 1:] + OCCLUSION_SIZE)
    patch = (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1).to(x.device)
    return x.masked_fill(patch, OCCLUSION_FILL)


def _assign_environments(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Environment ids (N,) for labels y (N,): balanced overall and within every class, shuffled by seed.

    Images are ordered by (class, random key) and dealt out 0, 1, 2, 0, 1, ... along that order: each class's
    images are spread over the environments (counts differ by at most one), and because the dealing runs on
    across class boundaries, the totals also differ by at most one.
    """
    generator = torch.Generator().manual_seed(seed)
    key = torch.randperm(len(y), generator=generator)
    # Sort by class first, random key second: class * N + key is a unique integer per image.
    order = torch.argsort(y * len(y) + key)
    env = torch.empty_like(y)
    env[order] = torch.arange(len(y)) % len(CORRUPTIONS)
    return env


def _corrupt_by_environment(x: torch.Tensor, env: torch.Tensor, seed: int) -> torch.Tensor:
    out = x.clone()
    for k, kind in enumerate(CORRUPTIONS):
        rows = (env == k).nonzero().squeeze(1)
        if len(rows):
            out[rows] = corrupt(x[rows], kind, seed)
    return out


def make_environment_split(split: DigitsSplit, seed: int = 0) -> EnvironmentSplit:
    """Put every image of a digits split in ONE corruption environment and corrupt it accordingly.

    Each image appears once (the dataset keeps its size), in environment k = its ``env`` id, corrupted with
    ``CORRUPTIONS[k]``. Assignment is balanced: environment sizes differ by at most one, overall and within every
    class, so an environment's ticket sees all ten digits. Train and test use different random streams derived
    from seed (train 2*seed, test 2*seed + 1) so test corruptions are fresh draws, not copies of training ones.

    Args:
        split: a :class:`DigitsSplit` (from :func:`load_digits_split`).
        seed: a non-negative int.

    Returns:
        :class:`EnvironmentSplit`: x_train (N_train, 1, 8, 8), y_train (N_train,), env_train (N_train,) int64 in
        [0, 3), and the same for test, plus ``environments`` = :data:`CORRUPTIONS`.

    Raises:
        TypeError: split is not a DigitsSplit.
        ValueError: a negative or non-int seed.

    Example:
        >>> envs = make_environment_split(load_digits_split(), seed=0)
        >>> torch.bincount(envs.env_train).tolist()
        [449, 449, 449]
    """
    if not isinstance(split, DigitsSplit):
        raise TypeError(f"split must be a DigitsSplit (from load_digits_split), got {type(split).__name__}")
    seed = _check_seed(seed)
    parts = []
    for offset, (x, y) in enumerate(((split.x_train, split.y_train), (split.x_test, split.y_test))):
        part_seed = 2 * seed + offset
        env = _assign_environments(y, part_seed)
        parts.append((_corrupt_by_environment(x, env, part_seed), y.clone(), env))
    (x_train, y_train, env_train), (x_test, y_test, env_test) = parts
    return EnvironmentSplit(
        x_train=x_train, y_train=y_train, env_train=env_train, x_test=x_test, y_test=y_test, env_test=env_test
    )
