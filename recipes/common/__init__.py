"""Models and data shared by the training recipes (not part of the ``hessopt`` package).

Imported as ``from recipes.common import ...`` with the repository root on ``sys.path`` (the recipe
scripts, benchmarks and tests put it there); the recipes' checkpoints are analyzed through
``recipes/image_classification/analyze.py``.

* :func:`build_model` — CIFAR ResNets (with switches for BatchNorm and residual connections), a
  tiny ``digits_cnn``, or any timm model.
* :func:`load_dataset` — ``digits`` (embedded), ``cifar10`` (pickles, JPEG folders or the JPEG
  archive, decoded once and cached), ``imagefolder`` (small in-memory sets), as :class:`ImageData`.
* :class:`DeviceLoader` — batches normalized and augmented on the device, in a reproducible,
  resumable order.
* :class:`FolderLoader` — ImageNet-size ``train/`` + ``val/`` trees (:func:`image_folders`) streamed
  with ``DataLoader`` workers (decoding and the standard ImageNet transforms in the workers), with
  the same interface, and batches that do not depend on the number of workers; :func:`fixed_batch`
  gives held-out images for curvature monitoring. Needs torchvision.

Example:
    >>> from recipes.common import build_model, load_dataset, DeviceLoader
    >>> data = load_dataset("digits")
    >>> model = build_model("cifar_resnet20", data.num_classes, in_chans=data.in_chans)
    >>> loader = DeviceLoader(data.train_x, data.train_y, 64, data.mean, data.std, shuffle=True)
"""
from .data import CIFAR10_CLASSES, DATASETS, ImageData, load_dataset
from .loader import DeviceLoader
from .models import ZOO_MODELS, CifarResNet, DigitsCNN, build_model
from .stream import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, fixed_batch, image_folders

__all__ = [
    "build_model",
    "load_dataset",
    "ImageData",
    "DeviceLoader",
    "FolderLoader",
    "image_folders",
    "fixed_batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarResNet",
    "DigitsCNN",
    "ZOO_MODELS",
    "DATASETS",
    "CIFAR10_CLASSES",
]
