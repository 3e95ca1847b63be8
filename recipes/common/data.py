r"""Image data sets as uint8 tensors in memory: the 8x8 digits, CIFAR-10, and small ImageFolder trees.

:func:`load_dataset` returns an :class:`ImageData`: ``uint8`` images of shape ``(N, C, H, W)``,
``int64`` labels, and the per-channel mean and standard deviation of the training images (in
``[0, 1]`` units) for normalization. Keeping the raw bytes in memory (and on the GPU, see
:class:`recipes.common.DeviceLoader`) makes the data pipeline cost nothing next to a training step:
CIFAR-10 is 180 MB as uint8.

Sources:

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 grey-scale digits shipped inside
  scikit-learn; no download). Pixel values 0..16 are scaled to 0..255. Fixed stratified split:
  within each class, in the data set's order, every 5th image is a test image (364 test, 1,433
  train), independent of any random generator or library version.
* ``cifar10`` from ``data_dir``, which may be

  1. torchvision's python-pickle release (a folder holding ``cifar-10-batches-py/`` or the batch
     files ``data_batch_1..5`` and ``test_batch`` themselves);
  2. JPEG/PNG folders ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (also inside a
     ``cifar10-jpeg/`` sub-folder);
  3. the archive ``cifar10-jpeg.tar.xz`` (the file itself, or a folder holding it), read as a
     stream and decoded once with Pillow.

  Default (``data_dir=None``): ``../shared/data/cifar10-jpeg.tar.xz`` beside the repository, else
  ``shared/data/cifar10-jpeg.tar.xz`` inside it. Decoded folders and archives are cached as
  ``.npy`` files in ``cache_dir`` (default ``$HESSOPT_CACHE`` or ``~/.cache/hessopt``), keyed by the
  source's file names and sizes; written atomically, so concurrent processes (``torchrun``) never
  read a partial file. Labels follow the standard order airplane automobile bird cat deer dog frog
  horse ship truck.
* ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``),
  the ImageNet / torchvision ``ImageFolder`` layout; classes sorted by name. **Limit:** this is an
  in-memory loader. All images must share one size (resize them beforehand, e.g. to 64x64 for a
  downsampled ImageNet) and the decoded set must fit in memory (refused above
  ``HESSOPT_MAX_IMAGEFOLDER_GB``, default 16 GB). Full-resolution ImageNet does not fit: stream it
  instead, with ``--stream`` in ``recipes/image_classification/train.py`` or, from Python,
  :class:`recipes.common.FolderLoader` (JPEGs decoded by ``DataLoader`` workers, images of any size,
  resized and cropped by the standard ImageNet transforms).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["ImageData", "load_dataset", "CIFAR10_CLASSES", "DATASETS", "default_cache_dir"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("digits", "cifar10", "imagefolder")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/data beside the repository (developer checkouts, CI), or shared/data inside it (copies)
_DEFAULT_CIFAR_ARCHIVES = tuple(root / "shared" / "data" / "cifar10-jpeg.tar.xz" for root in (_REPO_ROOT.parent, _REPO_ROOT))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """An image-classification data set held in memory.

    Attributes:
        train_x: ``uint8`` tensor ``(N, C, H, W)``.
        train_y: ``int64`` tensor ``(N,)``.
        test_x: ``uint8`` tensor ``(M, C, H, W)``.
        test_y: ``int64`` tensor ``(M,)``.
        num_classes: number of classes.
        in_chans: ``C``.
        mean: per-channel mean of the training images in ``[0, 1]`` units.
        std: per-channel standard deviation of the training images in ``[0, 1]`` units.
        name: ``"digits"``, ``"cifar10"`` or ``"imagefolder"``.
        classes: class names, index = label.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str
    classes: Tuple[str, ...] = ()

    @property
    def image_size(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.train_x.shape[2:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
            f"num_classes={self.num_classes})"
        )


def default_cache_dir() -> Path:
    """``$HESSOPT_CACHE`` if set, else ``~/.cache/hessopt``."""
    return Path(os.environ.get("HESSOPT_CACHE", Path.home() / ".cache" / "hessopt"))


def load_dataset(name: str, data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> ImageData:
    """Load ``digits``, ``cifar10`` or ``imagefolder`` as uint8 tensors (see the module docstring).

    Example:
        >>> data = recipes.common.load_dataset("digits")
        >>> data.train_x.shape, data.num_classes
        (torch.Size([1437, 1, 8, 8]), 10)
    """
    if name == "digits":
        return _load_digits()
    if name == "cifar10":
        return _load_cifar10(data_dir, cache_dir)
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("imagefolder needs data_dir: a folder with train/<class>/* and val/<class>/* (or test/)")
        return _load_imagefolder(Path(data_dir))
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


# --------------------------------------------------------------------------------------------------
# helpers


def _channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, exactly, from 256-bin histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for ch in range(x.shape[1]):
        hist = torch.bincount(x[:, ch].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5 or 1e-8)
    return tuple(means), tuple(stds)


def _make(name, train_x, train_y, test_x, test_y, classes) -> ImageData:
    train_x = torch.as_tensor(np.ascontiguousarray(train_x), dtype=torch.uint8)
    test_x = torch.as_tensor(np.ascontiguousarray(test_x), dtype=torch.uint8)
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.int64)
    test_y = torch.as_tensor(np.asarray(test_y), dtype=torch.int64)
    if train_x.dim() != 4 or test_x.dim() != 4 or train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"{name}: images must be (N, C, H, W) with one shape, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"{name}: images and labels differ in number")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"{name}: the training or the test split is empty")
    mean, std = _channel_stats(train_x)
    return ImageData(train_x, train_y, test_x, test_y, len(classes), int(train_x.shape[1]), mean, std, name, tuple(classes))


def _decode(data: bytes) -> np.ndarray:
    """One encoded image -> uint8 (C, H, W) RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return arr.transpose(2, 0, 1)


def _stack(images: List[np.ndarray], where: str, hint: str = "resize the images beforehand") -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}: images have different sizes {sorted(shapes)[:4]}...; this in-memory loader "
            f"needs one size: {hint}"
        )
    return np.stack(images)


# --------------------------------------------------------------------------------------------------
# digits


def _load_digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits data set comes from scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(y == c)[::5]] = True  # fixed stratified split: every 5th of each class
    return _make("digits", x[~test], y[~test], x[test], y[test], [str(c) for c in range(10)])


# --------------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(data_dir: Optional[str], cache_dir: Optional[str]) -> ImageData:
    if data_dir is None:
        found = [p for p in _DEFAULT_CIFAR_ARCHIVES if p.exists()]
        if not found:
            raise ValueError(
                "cifar10 needs data_dir (torchvision's cifar-10-batches-py folder, train/ and test/ "
                f"JPEG folders, or cifar10-jpeg.tar.xz); the defaults {[str(p) for p in _DEFAULT_CIFAR_ARCHIVES]} "
                "do not exist"
            )
        source = found[0]
    else:
        source = Path(data_dir).expanduser()
    if source.is_file():
        if not _is_archive(source):
            raise ValueError(f"{source} is a file but not a .tar/.tar.gz/.tar.xz archive")
        return _cached(source, cache_dir, lambda: _read_cifar_archive(source))
    if not source.is_dir():
        raise ValueError(f"cifar10 data_dir {source} does not exist")
    pickles = source / "cifar-10-batches-py"
    if (pickles / "data_batch_1").exists():
        return _read_cifar_pickles(pickles)
    if (source / "data_batch_1").exists():
        return _read_cifar_pickles(source)
    for root in (source, source / "cifar10-jpeg"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return _cached(root, cache_dir, lambda: _read_cifar_folders(root))
    archive = source / "cifar10-jpeg.tar.xz"
    if archive.exists():
        return _cached(archive, cache_dir, lambda: _read_cifar_archive(archive))
    raise ValueError(
        f"no CIFAR-10 found in {source}: expected cifar-10-batches-py/ (torchvision pickles), "
        "train/<class>/*.jpg + test/<class>/*.jpg, or cifar10-jpeg.tar.xz"
    )


def _is_archive(path: Path) -> bool:
    return any(str(path).endswith(ext) for ext in (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"))


def _read_cifar_pickles(folder: Path) -> ImageData:
    def read(name: str):
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return _make("cifar10", train_x, train_y, test_x, test_y, CIFAR10_CLASSES)


def _cifar_key(parts: Sequence[str]) -> Optional[Tuple[str, int, str]]:
    """``(split, label, file name)`` for a path ending in ``train|test/<class>/<file>``, else None."""
    if len(parts) < 3:
        return None
    split, cls, fname = parts[-3], parts[-2], parts[-1]
    if split not in ("train", "test") or cls not in CIFAR10_CLASSES or not fname.lower().endswith(_IMAGE_EXTENSIONS):
        return None
    return split, CIFAR10_CLASSES.index(cls), fname


def iter_archive_images(path: Path, limit: Optional[int] = None) -> Iterator[Tuple[Tuple[str, int, str], np.ndarray]]:
    """Stream ``((split, label, file name), uint8 CHW image)`` from a CIFAR-10 JPEG archive, in archive order.

    ``limit`` stops after that many images (tests read the first few members of the real archive).
    """
    count = 0
    with tarfile.open(path, mode="r|*") as tar:  # a stream: one pass, no random access, no extraction
        for member in tar:
            if not member.isfile():
                continue
            key = _cifar_key(member.name.split("/"))
            if key is None:
                continue
            fileobj = tar.extractfile(member)
            yield key, _decode(fileobj.read())
            count += 1
            if limit is not None and count >= limit:
                return


def _split_sorted(items: List[Tuple[Tuple[str, int, str], np.ndarray]], where: str) -> ImageData:
    items.sort(key=lambda kv: kv[0])  # deterministic order whatever the archive/file-system order
    out: Dict[str, Tuple[List[np.ndarray], List[int]]] = {"train": ([], []), "test": ([], [])}
    for (split, label, _), img in items:
        out[split][0].append(img)
        out[split][1].append(label)
    for split in ("train", "test"):
        if not out[split][0]:
            raise ValueError(f"{where}: no {split} images found under {split}/<class>/")
    return _make(
        "cifar10",
        _stack(out["train"][0], where),
        out["train"][1],
        _stack(out["test"][0], where),
        out["test"][1],
        CIFAR10_CLASSES,
    )


def _read_cifar_archive(path: Path) -> ImageData:
    return _split_sorted(list(iter_archive_images(path)), str(path))


def _read_cifar_folders(root: Path) -> ImageData:
    items = []
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in _IMAGE_EXTENSIONS:
                    items.append(((split, label, f.name), _decode(f.read_bytes())))
    return _split_sorted(items, str(root))


# --------------------------------------------------------------------------------------------------
# cache


def _source_fingerprint(source: Path) -> str:
    """A short hash of a file's name and size, or of a folder's relative file names and sizes."""
    h = hashlib.sha1()
    if source.is_file():
        h.update(f"{source.name}:{source.stat().st_size}".encode())
    else:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                h.update(f"{p.relative_to(source)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


_CACHE_FIELDS = ("train_x", "train_y", "test_x", "test_y")


def _cached(source: Path, cache_dir: Optional[str], build) -> ImageData:
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = f"cifar10-{_source_fingerprint(source)}"
    paths = {f: folder / f"{stem}-{f}.npy" for f in _CACHE_FIELDS}
    if all(p.exists() for p in paths.values()):
        arrays = {f: np.load(p) for f, p in paths.items()}
        return _make("cifar10", arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], CIFAR10_CLASSES)
    data = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for f, p in paths.items():
            tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, getattr(data, f).numpy())
            os.replace(tmp, p)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError as err:  # a read-only cache is not fatal: the data is decoded already
        import warnings

        warnings.warn(f"could not write the data cache in {folder}: {err}", RuntimeWarning, stacklevel=3)
    return data


# --------------------------------------------------------------------------------------------------
# ImageFolder

_STREAM_HINT = ("stream the JPEGs instead: --stream in recipes/image_classification/train.py, or "
                "recipes.common.FolderLoader from Python (any image size, DataLoader workers)")


def _load_imagefolder(root: Path) -> ImageData:
    root = root.expanduser()
    train = root / "train"
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise ValueError(f"imagefolder expects {root}/train/<class>/* and {root}/val/<class>/* (or test/)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {train}")
    files = {
        split: [
            (f, label)
            for label, cls in enumerate(classes)
            if (folder / cls).is_dir()
            for f in sorted((folder / cls).iterdir())
            if f.suffix.lower() in _IMAGE_EXTENSIONS
        ]
        for split, folder in (("train", train), ("test", test))
    }
    extra = sorted({d.name for d in test.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise ValueError(f"{test} has classes that {train} lacks: {extra[:5]}")
    if not files["train"] or not files["test"]:
        raise ValueError(f"imagefolder: no images in {train} or {test}")
    first = _decode(files["train"][0][0].read_bytes())
    need_gb = first.nbytes * (len(files["train"]) + len(files["test"])) / 2**30
    limit_gb = float(os.environ.get("HESSOPT_MAX_IMAGEFOLDER_GB", 16))
    if need_gb > limit_gb:
        raise ValueError(
            f"imagefolder would hold {need_gb:.1f} GB of decoded images in memory (limit {limit_gb:g} GB, "
            f"HESSOPT_MAX_IMAGEFOLDER_GB): this loader is for small sets; downsample the images, or {_STREAM_HINT}"
        )
    out = {}
    for split, items in files.items():
        images = [_decode(f.read_bytes()) for f, _ in items]
        out[split] = (_stack(images, str(root / split), hint=f"resize the images beforehand, or {_STREAM_HINT}"),
                      [label for _, label in items])
    return _make("imagefolder", out["train"][0], out["train"][1], out["test"][0], out["test"][1], classes)
