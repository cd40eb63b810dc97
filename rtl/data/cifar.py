"""CIFAR-10 / CIFAR-100 from a local copy, and the paper's CIFAR-100 cluster partition.

The paper (arXiv 2601.22141, §1.2) routes CIFAR-10 by class (10 tickets) and CIFAR-100 by 8 semantic clusters
of its 100 classes (Table 5). This module holds

- :data:`CIFAR100_CLUSTERS` and :func:`cifar100_cluster_partition`: that partition (read from
  ``cifar100_clusters.json`` beside this file), as class names and as lists of class indices;
- :func:`load_cifar`: a whole split as normalised tensors (N, 3, 32, 32) with labels and class names;
- :class:`CIFARTensorDataset` and :func:`cifar_dataset`: the same data as a ``torch.utils.data.Dataset`` for a
  ``DataLoader``, with the standard augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal
  flip) when asked.

Nothing is downloaded unless ``download=True``. Files are read with torchvision's CIFAR10 / CIFAR100 classes from
the python-pickle layout (``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``,
``<root>/cifar-100-python/{train, test, meta}``). torchvision also compares each file's MD5 with the official
archive's; with ``download=False`` and ``verify_checksums=False`` (the default) that comparison is skipped and the
files only have to exist and unpickle, so a re-packed or reduced copy in the same format loads too. Pass
``verify_checksums=True`` to insist on the official files.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CIFAR100_CLASSES",
    "CIFAR100_CLUSTERS",
    "CIFAR10_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFARData",
    "CIFARTensorDataset",
    "cifar100_cluster_partition",
    "cifar_dataset",
    "load_cifar",
]

#: CIFAR-10 class names in label order (as in ``batches.meta``).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: CIFAR-100 fine class names in label order (as in the ``meta`` file's ``fine_label_names``: alphabetical).
CIFAR100_CLASSES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)

#: Per-channel mean of the training images (RGB, on the [0, 1] scale), used to normalise.
CIFAR_MEAN = MappingProxyType({"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)})
#: Per-channel standard deviation of the training images' pixels (RGB, [0, 1] scale), used to normalise.
CIFAR_STD = MappingProxyType({"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)})


def _load_clusters() -> MappingProxyType:
    with open(Path(__file__).with_name("cifar100_clusters.json"), encoding="utf-8") as f:
        raw = json.load(f)
    return MappingProxyType({c["name"]: tuple(c["classes"]) for c in raw["clusters"]})


#: The paper's Table 5: cluster name -> its CIFAR-100 class names, in the paper's cluster order (cluster k, the k-th
#: item, is ticket k). Sizes 9, 28, 22, 15, 8, 9, 4, 5; together every class exactly once.
CIFAR100_CLUSTERS = _load_clusters()

_DATASETS = ("cifar10", "cifar100")
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def cifar100_cluster_partition(class_names: Sequence[str] | None = None) -> list[list[int]]:
    """The paper's 8 CIFAR-100 clusters (Table 5) as lists of class indices.

    Args:
        class_names: the dataset's 100 class names in label order, e.g. ``load_cifar("cifar100", root).classes``
            or torchvision's ``CIFAR100(...).classes``. Names are matched case-insensitively with spaces read as
            underscores ("lawn mower" == "lawn_mower"). Default: :data:`CIFAR100_CLASSES`, the official order.

    Returns:
        8 lists of class indices, cluster k first-to-last in the paper's order, each list increasing. Together they
        hold every index 0..99 exactly once; ready for ``rtl.routers.LabelRouter(partition)``.

    Raises:
        TypeError: class_names is not a sequence of strings.
        ValueError: class_names has a duplicate, or does not hold exactly the 100 CIFAR-100 classes (the message
            names the missing and the unknown ones).

    Example:
        >>> partition = cifar100_cluster_partition()
        >>> [len(group) for group in partition]
        [9, 28, 22, 15, 8, 9, 4, 5]
    """
    if class_names is None:
        class_names = CIFAR100_CLASSES
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a sequence of class names, got {type(class_names).__name__}")
    bad = next((n for n in class_names if not isinstance(n, str)), None)
    if bad is not None:
        raise TypeError(f"class_names must hold strings, got {bad!r} ({type(bad).__name__})")
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        key = _normalise_name(name)
        if key in index:
            raise ValueError(f"class_names has {name!r} twice (at {index[key]} and {i})")
        index[key] = i
    wanted = [c for classes in CIFAR100_CLUSTERS.values() for c in classes]
    missing = sorted(set(wanted) - set(index))
    unknown = sorted(set(index) - set(wanted))
    if missing or unknown:
        raise ValueError(
            f"class_names must hold exactly the 100 CIFAR-100 classes; missing {missing}, unknown {unknown}"
        )
    return [sorted(index[c] for c in classes) for classes in CIFAR100_CLUSTERS.values()]


def _check_flag(arg: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be a bool, got {value!r}")


def _check_name(name: Any) -> str:
    if name not in _DATASETS:
        raise ValueError(f"name must be one of {_DATASETS}, got {name!r}")
    return name


def _missing_files(name: str, root: Path) -> list[str]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    folder = root / cls.base_folder
    return [f"{cls.base_folder}/{f}" for f in files if not (folder / f).is_file()]


def _unchecked_class(name: str) -> type:
    """A torchvision CIFAR class that checks that its files exist, not their MD5 sums (see the module docstring)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class _Unchecked(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = list(data[self.meta["key"]])
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    _Unchecked.__name__ = f"Unchecked{base.__name__}"
    return _Unchecked


def _read(
    name: str, root: str | os.PathLike, train: bool, download: bool, verify_checksums: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The split's images (N, 3, 32, 32) uint8, labels (N,) int64 and class names, through torchvision."""
    from torchvision.datasets import CIFAR10, CIFAR100

    name = _check_name(name)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    for arg, value in (("train", train), ("download", download), ("verify_checksums", verify_checksums)):
        _check_flag(arg, value)
    root_path = Path(root).expanduser()
    pretty, folder = _PRETTY[name], _FOLDERS[name]
    how = (
        f"Pass download=True (--download on the command line) to fetch it, or extract {_ARCHIVES[name]} so that "
        f"the folder {folder}/ lies under {str(root_path)!r}."
    )
    if not download:
        if not root_path.is_dir():
            raise FileNotFoundError(f"{pretty} root {str(root_path)!r} does not exist. {how}")
        missing = _missing_files(name, root_path)
        if missing:
            raise FileNotFoundError(f"{pretty} not found under {str(root_path)!r}: missing {', '.join(missing)}. {how}")
    if download or verify_checksums:
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        try:
            dataset = cls(str(root_path), train=train, download=download)
        except RuntimeError as e:
            raise ValueError(
                f"{pretty} files under {str(root_path)!r} are not the official ones (MD5 mismatch: "
                f"{e}). Re-extract {_ARCHIVES[name]}, or pass verify_checksums=False to read them "
                f"anyway."
            ) from e
    else:
        try:
            dataset = _unchecked_class(name)(str(root_path), train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"{pretty} files under {str(root_path / folder)!r} are not CIFAR python pickles "
                f"({type(e).__name__}: {e}). Re-extract {_ARCHIVES[name]}."
            ) from e
    images = np.ascontiguousarray(np.asarray(dataset.data, dtype=np.uint8).transpose(0, 3, 1, 2))
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images, labels, list(dataset.classes)


def _mean_std(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CIFAR_MEAN[name], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD[name], dtype=torch.float32).view(3, 1, 1)
    return mean, std


class CIFARData(NamedTuple):
    """One CIFAR split as tensors; a named tuple, so ``x, y, classes = load_cifar(...)`` works too.

    Attributes:
        x: images (N, 3, 32, 32) float32, RGB, ``(pixel / 255 - mean) / std`` per channel with
            ``CIFAR_MEAN[name]`` and ``CIFAR_STD[name]`` (or ``pixel / 255`` when loaded with normalize=False).
        y: labels (N,) int64 (fine labels for CIFAR-100).
        classes: class names in label order (from the dataset's meta file).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


def load_cifar(
    name: str = "cifar10",
    root: str | os.PathLike = "data",
    download: bool = False,
    train: bool = True,
    normalize: bool = True,
    verify_checksums: bool = False,
) -> CIFARData:
    """Load a whole CIFAR-10 or CIFAR-100 split as tensors.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (torchvision's layout).
        download: fetch and extract the official archive into root first if it is not there (needs the network).
        train: the 50,000-image training split if True, else the 10,000-image test split.
        normalize: subtract ``CIFAR_MEAN[name]`` and divide by ``CIFAR_STD[name]`` per channel; else [0, 1].
        verify_checksums: compare the files' MD5 with the official ones (always done when download=True).

    Returns:
        :class:`CIFARData` with x (N, 3, 32, 32) float32, y (N,) int64 and the class names.

    Raises:
        FileNotFoundError: root, or one of the split's files, is missing (and download=False); the message says
            how to get the data.
        ValueError: an unknown name, or files that are not CIFAR pickles (or fail verify_checksums).
        TypeError: root not a path, or a non-bool flag.

    Example:
        >>> data = load_cifar("cifar10", root="~/data", train=False)  # doctest: +SKIP
        >>> data.x.shape, data.y.shape, data.classes[0]  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), torch.Size([10000]), 'airplane')
    """
    _check_flag("normalize", normalize)
    images, labels, classes = _read(name, root, train, download, verify_checksums)
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    if normalize:
        mean, std = _mean_std(name)
        x.sub_(mean).div_(std)
    return CIFARData(x=x, y=torch.from_numpy(labels), classes=classes)


class CIFARTensorDataset(Dataset):
    """CIFAR images held as uint8 in memory, served as normalised float tensors, optionally augmented.

    Augmentation (train-time, when ``augment=True``) is the standard CIFAR recipe, done with
    ``torchvision.transforms.v2`` on the uint8 image before normalisation: pad 4 pixels of black on every side,
    crop a random 32x32 window, flip left-right with probability 1/2. It draws from torch's global RNG, which a
    ``DataLoader`` seeds per worker.

    Args:
        images: (N, 3, 32, 32) uint8 RGB.
        labels: (N,) integer labels.
        classes: class names in label order.
        mean: per-channel mean (3 floats) subtracted after scaling to [0, 1]; None skips normalisation.
        std: per-channel standard deviation (3 floats); None when mean is None.
        augment: apply the random crop and flip.

    Items are ``(x, y)`` with x (3, 32, 32) float32 and y a Python int.

    Example:
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> ds = CIFARTensorDataset(images, torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"], augment=True)
        >>> x, y = ds[2]
        >>> x.shape, y
        (torch.Size([3, 32, 32]), 2)
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
    ):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                f"images must be a uint8 tensor, got "
                f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype == torch.bool
            or labels.is_floating_point()
            or labels.is_complex()
        ):
            raise TypeError(
                f"labels must be an integer tensor (N,), got "
                f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}")
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or both None)")
        _check_flag("augment", augment)
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.augment = augment
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._transform = None
        if augment:
            from torchvision.transforms import v2

            self._transform = v2.Compose(
                [v2.RandomCrop(images.shape[-1], padding=4, fill=0), v2.RandomHorizontalFlip(p=0.5)]
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self._transform is not None:
            image = self._transform(image)
        x = image.to(torch.float32).div_(255.0)
        if self._mean is not None:
            x.sub_(self._mean).div_(self._std)
        return x, int(self.labels[index])


def cifar_dataset(
    name: str = "cifar10",
    root: str | os.PathLike = "data",
    download: bool = False,
    train: bool = True,
    augment: bool = False,
    normalize: bool = True,
    verify_checksums: bool = False,
) -> CIFARTensorDataset:
    """A CIFAR split as a ``torch.utils.data.Dataset`` (for a ``DataLoader``), optionally augmented.

    Args:
        name, root, download, train, normalize, verify_checksums: as in :func:`load_cifar`.
        augment: random crop (4-pixel padding) and horizontal flip per item, for training.

    Returns:
        :class:`CIFARTensorDataset` whose items are (x (3, 32, 32) float32, label int); ``.classes`` holds the
        class names and ``.labels`` (N,) all labels (e.g. to route or to split by ticket without loading images).

    Raises:
        FileNotFoundError, ValueError, TypeError: as :func:`load_cifar`.

    Example:
        >>> ds = cifar_dataset("cifar100", root="~/data", augment=True)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True)  # doctest: +SKIP
    """
    _check_flag("normalize", normalize)
    _check_flag("augment", augment)
    images, labels, classes = _read(name, root, train, download, verify_checksums)
    mean, std = (CIFAR_MEAN[name], CIFAR_STD[name]) if normalize else (None, None)
    return CIFARTensorDataset(
        torch.from_numpy(images), torch.from_numpy(labels), classes, mean=mean, std=std, augment=augment
    )
