"""The paper's implicit-neural-representation (INR) task on an image bundled with scikit-image.

In the paper (arXiv 2601.22141, §1.2 and App. C) an MLP maps a pixel's coordinates to its colour, and each pixel is
routed to the ticket of its semantic-segmentation class within the image (ADE20K annotations; all instances of a
category merged into one class; small noisy pixels reassigned to a neighbouring class). ADE20K is not available
offline, so :func:`load_inr_image` stands in for it with a bundled image (``skimage.data``) and a segmentation
computed from the image itself:

1. k-means (scikit-learn) on per-pixel features (CIE-Lab colour, and position weighted by ``position_weight``)
   gives ``num_regions`` colour-and-place classes; a class may be spatially split, like "all instances of a
   category" in the paper;
2. every connected piece smaller than ``min_piece_pixels`` is reassigned to the neighbouring class it borders most
   (the paper's "reassigned to a neighboring semantic class");
3. a class left with fewer than ``min_region_fraction`` of the pixels is merged into the neighbour it borders
   most, and the largest class is cut in two equal halves across its long spatial axis until there are
   ``num_regions`` classes again, each large enough;
4. classes are numbered by size, region 0 the largest.

Any stage is deterministic given ``seed`` (k-means ``random_state``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["INR_IMAGES", "INRImage", "load_inr_image"]

#: The scikit-image images that ship with the package (no download); grey ones are replicated to 3 channels,
#: an alpha channel is dropped.
INR_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "shepp_logan_phantom",
    "text",
)

# k-means restarts: fixed (not "auto") so a seed gives the same regions whatever scikit-learn's default becomes.
_KMEANS_N_INIT = 10

# Rounds of (merge tiny classes, split the largest) before giving up. Each round changes at least one class, and
# in practice one or two rounds settle it; the bound only turns a pathological image into a clear error.
_MAX_ROUNDS = 50


@dataclass(frozen=True)
class INRImage:
    """An image prepared for coordinate-to-colour fitting, with a region (ticket) per pixel.

    Pixels are flattened row-major: pixel i is at row ``i // W``, column ``i % W``.

    Attributes:
        image: colours (H, W, 3) float32 in [0, 1].
        coords: pixel coordinates (H*W, 2) float32 in [-1, 1]: column 0 is x (the column, -1 at the left edge,
            +1 at the right), column 1 is y (the row, -1 at the top, +1 at the bottom).
        pixels: colours (H*W, 3) float32, ``image.reshape(-1, 3)``.
        regions: region id per pixel (H*W,) int64 in [0, R); region 0 is the largest.
        region_names: R names, ``region_names[k]`` for id k.
        name: the image's name (the skimage.data function), or "array" for an array given directly.
    """

    image: torch.Tensor
    coords: torch.Tensor
    pixels: torch.Tensor
    regions: torch.Tensor
    region_names: list[str]
    name: str

    @property
    def num_regions(self) -> int:
        """R, the number of regions (tickets)."""
        return len(self.region_names)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.image.shape[0]), int(self.image.shape[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Any 2-D grey, (H, W, 3) or (H, W, 4) image -> (H, W, 3) float64 in [0, 1]."""
    from skimage.util import img_as_float

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]  # drop alpha: the INR fits colour only
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{what} must be a grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) image, got shape {image.shape}"
        )
    if image.dtype == bool:
        image = image.astype(np.float64)
    image = img_as_float(image).astype(np.float64)
    return np.clip(image, 0.0, 1.0)


def _resize(image: np.ndarray, size: Any) -> np.ndarray:
    from skimage.transform import resize

    if _is_int(size):
        if size < 2:
            raise ValueError(f"size must be an int >= 2 or a pair (H, W) of ints >= 2, got {size!r}")
        # Centre-crop to a square first so a non-square image keeps its aspect ratio.
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
        out_shape = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and s >= 2 for s in size):
        out_shape = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int >= 2 or a pair (H, W) of ints >= 2, got {size!r}")
    return resize(image, out_shape + (3,), anti_aliasing=True, mode="reflect")


def _features(image: np.ndarray, position_weight: float) -> np.ndarray:
    """Per-pixel features (H*W, 5): Lab colour scaled to about [-1, 1] and (x, y) in [-1, 1] times the weight."""
    from skimage.color import rgb2lab

    h, w = image.shape[:2]
    lab = rgb2lab(image).reshape(-1, 3)
    # L in [0, 100], a and b in about [-128, 127]: bring all three to a unit-ish range so no channel dominates.
    colour = lab / np.array([50.0, 128.0, 128.0]) - np.array([1.0, 0.0, 0.0])
    ys, xs = np.meshgrid(np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w), indexing="ij")
    position = np.stack([xs.ravel(), ys.ravel()], axis=1) * position_weight
    return np.concatenate([colour, position], axis=1)


def _border_counts(labels: np.ndarray, piece: np.ndarray) -> dict[int, int]:
    """How many 4-neighbour pixel pairs the boolean mask ``piece`` shares with each other label."""
    counts: dict[int, int] = {}
    for axis in (0, 1):
        for shift in (1, -1):
            moved = np.roll(piece, shift, axis=axis)
            # np.roll wraps around; the wrapped row/column is not a real neighbour.
            edge = [slice(None), slice(None)]
            edge[axis] = 0 if shift == 1 else -1
            moved[tuple(edge)] = False
            touching = labels[moved & ~piece]
            for value, count in zip(*np.unique(touching, return_counts=True)):
                counts[int(value)] = counts.get(int(value), 0) + int(count)
    return counts


def _absorb(labels: np.ndarray, piece: np.ndarray) -> bool:
    """Give the pixels of ``piece`` the neighbouring label it borders most; False if it has no neighbour."""
    rows = np.flatnonzero(piece.any(axis=1))
    cols = np.flatnonzero(piece.any(axis=0))
    # Work on the piece's bounding box grown by one pixel: every neighbour lies inside it, and a large image
    # with hundreds of specks then costs hundreds of tiny windows, not hundreds of full-image passes.
    window = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    sub_labels, sub_piece = labels[window], piece[window]
    own = int(sub_labels[sub_piece][0])
    counts = {k: v for k, v in _border_counts(sub_labels, sub_piece).items() if k != own}
    if not counts:
        return False
    # Longest border wins; ties go to the smaller label so the result does not depend on dict order.
    target = min(counts, key=lambda k: (-counts[k], k))
    sub_labels[sub_piece] = target  # a view into labels: edits it in place
    return True


def _reassign_small_pieces(labels: np.ndarray, min_piece_pixels: int) -> None:
    """In place: connected pieces below min_piece_pixels join the neighbouring class they border most."""
    from skimage.measure import label as connected

    changed = True
    while changed:
        changed = False
        pieces = connected(labels + 1, connectivity=1, background=0)
        sizes = np.bincount(pieces.ravel())
        # Smallest first, so a speck inside a small piece does not pick the piece's soon-to-change label. A piece
        # absorbed here may merge with its neighbour into one larger piece; the next pass sees the new pieces.
        for piece_id in np.argsort(sizes[1:], kind="stable") + 1:
            if sizes[piece_id] >= min_piece_pixels:
                break
            changed |= _absorb(labels, pieces == piece_id)


def _segment(
    image: np.ndarray,
    num_regions: int,
    seed: int,
    position_weight: float,
    min_region_fraction: float,
    min_piece_pixels: int,
) -> np.ndarray:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    h, w = image.shape[:2]
    features = _features(image, position_weight)
    min_pixels = int(np.ceil(min_region_fraction * h * w))

    # One thread: on a busy machine scikit-learn's OpenMP k-means on a few thousand points ran 50x slower with
    # a thread per core (20 s instead of 0.4 s for 4,096 x 5 features, 10 restarts, 2 cores under load).
    with threadpool_limits(limits=1):
        labels = (
            KMeans(n_clusters=num_regions, n_init=_KMEANS_N_INIT, random_state=seed).fit_predict(features).reshape(h, w)
        )
    for _ in range(_MAX_ROUNDS):
        _reassign_small_pieces(labels, min_piece_pixels)
        present, sizes = np.unique(labels, return_counts=True)
        tiny = [int(k) for k, n in zip(present, sizes) if n < min_pixels]
        if tiny:
            if len(present) == 1:
                break
            _absorb(labels, labels == tiny[0])
            continue
        if len(present) == num_regions:
            break
        # Too few classes after merging: cut the largest one across its long spatial axis into two halves of
        # equal size. The largest class holds >= 1/R of the image, so each half holds >= 1/(2R): above the 2 %
        # default for R <= 25, so the cut does not undo the merge that led here. (A 2-means split can leave a
        # tiny half, and then merge and split cycle; seen on astronaut at 128 px with R = 15.)
        largest = int(present[np.argmax(sizes)])
        inside = np.flatnonzero(labels.ravel() == largest)
        points = np.stack(np.unravel_index(inside, (h, w)), axis=1).astype(np.float64)
        points -= points.mean(axis=0)
        axis = np.linalg.svd(points, full_matrices=False)[2][0]
        rank = np.argsort(points @ axis, kind="stable")
        free = int(min(set(range(num_regions)) - set(present.tolist())))
        labels[np.unravel_index(inside[rank[len(rank) // 2 :]], (h, w))] = free
    present, sizes = np.unique(labels, return_counts=True)
    if len(present) != num_regions or sizes.min() < min_pixels:
        raise ValueError(
            f"could not cut the image into num_regions={num_regions} regions of at least "
            f"min_region_fraction={min_region_fraction} of the pixels each (got sizes "
            f"{sorted(sizes.tolist(), reverse=True)}); ask for fewer regions, a larger size or a "
            f"smaller min_region_fraction"
        )
    # Number by size, largest first; ties by the first pixel in raster order, so the numbering is deterministic.
    first = np.array([np.flatnonzero(labels.ravel() == k)[0] for k in present])
    order = sorted(range(len(present)), key=lambda i: (-sizes[i], first[i]))
    relabel = np.empty(int(present.max()) + 1, dtype=np.int64)
    relabel[present[order]] = np.arange(len(present))
    return relabel[labels]


def load_inr_image(
    name: str | np.ndarray = "astronaut",
    size: int | tuple[int, int] = 64,
    num_regions: int = 6,
    seed: int = 0,
    position_weight: float = 0.5,
    min_region_fraction: float = 0.02,
    min_piece_pixels: int | None = None,
) -> INRImage:
    """Load a bundled image, resize it, and cut it into regions, one ticket per region.

    Args:
        name: one of :data:`INR_IMAGES` (``skimage.data.<name>()``), or an image array: grey (H, W),
            RGB (H, W, 3) or RGBA (H, W, 4), integer or float (as ``skimage.util.img_as_float`` reads it).
        size: an int S gives an S x S image (a non-square image is centre-cropped to a square first, keeping its
            aspect ratio); a pair (H, W) resizes to exactly that. Resizing uses anti-aliasing.
        num_regions: R >= 1, the number of regions (tickets).
        seed: k-means ``random_state``; a non-negative int.
        position_weight: how much a pixel's position counts against its colour in the clustering; 0 gives pure
            colour classes (often scattered), larger values give compact blobs.
        min_region_fraction: smallest share of the pixels a region may have, in [0, 1/R].
        min_piece_pixels: connected pieces smaller than this join a neighbouring region. Default: 0.5 % of the
            pixels (at least 2), the scale of boundary noise.

    Returns:
        :class:`INRImage` with image (H, W, 3), coords (H*W, 2) in [-1, 1] (x = column, y = row), pixels (H*W, 3),
        regions (H*W,) int64 in [0, R) (region 0 the largest), region_names ``["region_0", ...]``.

    Raises:
        ValueError: an unknown image name, a bad size, num_regions, seed, position_weight or
            min_region_fraction, or an image that cannot be cut into R regions of the required size.
        TypeError: name is neither a string nor an array.

    Example:
        >>> inr = load_inr_image("astronaut", size=32, num_regions=4)
        >>> inr.coords.shape, inr.pixels.shape, inr.regions.max().item()
        (torch.Size([1024, 2]), torch.Size([1024, 3]), 3)
    """
    if isinstance(name, str):
        if name not in INR_IMAGES:
            raise ValueError(f"name must be one of {INR_IMAGES} (images bundled with scikit-image), got {name!r}")
        import skimage.data

        raw = getattr(skimage.data, name)()
        label = name
    elif isinstance(name, (np.ndarray, torch.Tensor)):
        raw = name.detach().cpu().numpy() if isinstance(name, torch.Tensor) else name
        label = "array"
    else:
        raise TypeError(f"name must be an image name (str) or an image array, got {type(name).__name__}")
    if not _is_int(num_regions) or num_regions < 1:
        raise ValueError(f"num_regions must be a positive int, got {num_regions!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if (
        isinstance(position_weight, bool)
        or not isinstance(position_weight, numbers.Real)
        or not np.isfinite(position_weight)
        or position_weight < 0
    ):
        raise ValueError(f"position_weight must be a finite number >= 0, got {position_weight!r}")
    if (
        isinstance(min_region_fraction, bool)
        or not isinstance(min_region_fraction, numbers.Real)
        or not 0.0 <= min_region_fraction <= 1.0 / num_regions
    ):
        raise ValueError(
            f"min_region_fraction must be a number in [0, 1/num_regions] = [0, {1.0 / num_regions:g}], "
            f"got {min_region_fraction!r}"
        )
    image = _resize(_as_rgb(raw, "name"), size)
    h, w = image.shape[:2]
    if num_regions > h * w:
        raise ValueError(f"num_regions must be at most the number of pixels {h * w}, got {num_regions}")
    if min_piece_pixels is None:
        min_piece_pixels = max(2, int(round(0.005 * h * w)))
    elif not _is_int(min_piece_pixels) or min_piece_pixels < 1:
        raise ValueError(f"min_piece_pixels must be a positive int or None, got {min_piece_pixels!r}")
    regions = _segment(
        image, int(num_regions), int(seed), float(position_weight), float(min_region_fraction), int(min_piece_pixels)
    )

    image_t = torch.from_numpy(image.astype(np.float32))
    ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, h), torch.linspace(-1.0, 1.0, w), indexing="ij")
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    return INRImage(
        image=image_t,
        coords=coords,
        pixels=image_t.reshape(-1, 3).clone(),
        regions=torch.from_numpy(regions.reshape(-1)).to(torch.int64),
        region_names=[f"region_{k}" for k in range(int(num_regions))],
        name=label,
    )
