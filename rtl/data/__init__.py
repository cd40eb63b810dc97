"""Datasets for rtl's experiments: what each input is and which ticket it is routed to.

- :mod:`rtl.data.digits`: scikit-learn's 8x8 digits (bundled, no download) with a stratified split, and three
  corruption environments (noise, blur, occlusion) to route on, a small stand-in for the paper's environment tickets;
- :mod:`rtl.data.inr_image`: the implicit-neural-representation task on an image bundled with scikit-image, with
  a per-pixel region id standing in for the paper's semantic-segmentation classes;
- :mod:`rtl.data.cifar`: CIFAR-10 / CIFAR-100 from a local copy (download only when asked) and the paper's
  8-cluster CIFAR-100 partition (Table 5).
- :mod:`rtl.data.speech`: noisy speech in three acoustic environments, made offline (espeak-ng speech or a numpy
  formant synthesiser, synthetic scene noise), and the STFT front end of the speech U-Net.

Everything is deterministic given its seed.
"""

from .cifar import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR100_CLUSTERS,
    CIFAR_MEAN,
    CIFAR_STD,
    CIFARData,
    CIFARTensorDataset,
    cifar100_cluster_partition,
    cifar_dataset,
    load_cifar,
)
from .digits import CORRUPTIONS, DigitsSplit, EnvironmentSplit, corrupt, load_digits_split, make_environment_split
from .inr_image import INR_IMAGES, INRImage, load_inr_image

__all__ = [
    "CIFAR100_CLASSES",
    "CIFAR100_CLUSTERS",
    "CIFAR10_CLASSES",
    "CIFARData",
    "CIFARTensorDataset",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CORRUPTIONS",
    "DigitsSplit",
    "EnvironmentSplit",
    "INRImage",
    "INR_IMAGES",
    "cifar100_cluster_partition",
    "cifar_dataset",
    "corrupt",
    "load_cifar",
    "load_digits_split",
    "load_inr_image",
    "make_environment_split",
]
