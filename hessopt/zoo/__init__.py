"""Models and data shared by the training recipes and ``hessopt analyze``.

* :func:`build_model` — CIFAR ResNets (with switches for BatchNorm and residual connections), a
  tiny ``digits_cnn``, or any timm model.
* :func:`load_dataset` — ``digits`` (embedded), ``cifar10`` (pickles, JPEG folders or the JPEG
  archive, decoded once and cached), ``imagefolder`` (small in-memory sets), as :class:`ImageData`.
* :class:`DeviceLoader` — batches normalized and augmented on the device, in a reproducible,
  resumable order.

Example:
    >>> from hessopt.zoo import build_model, load_dataset, DeviceLoader
    >>> data = load_dataset("digits")
    >>> model = build_model("cifar_resnet20", data.num_classes, in_chans=data.in_chans)
    >>> loader = DeviceLoader(data.train_x, data.train_y, 64, data.mean, data.std, shuffle=True)
"""
from .data import CIFAR10_CLASSES, DATASETS, ImageData, load_dataset
from .loader import DeviceLoader
from .models import ZOO_MODELS, CifarResNet, DigitsCNN, build_model

__all__ = [
    "build_model",
    "load_dataset",
    "ImageData",
    "DeviceLoader",
    "CifarResNet",
    "DigitsCNN",
    "ZOO_MODELS",
    "DATASETS",
    "CIFAR10_CLASSES",
]
