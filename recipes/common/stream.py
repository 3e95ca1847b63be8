r"""Stream large ImageFolder trees (ImageNet layout) with DataLoader workers, reproducibly.

:class:`recipes.common.DeviceLoader` keeps a whole data set on the device as uint8; that is the
right thing for CIFAR-10 (180 MB) and impossible for ImageNet (1.28 M JPEGs of different sizes,
hundreds of GB decoded). :class:`FolderLoader` reads such trees image by image: a
``torchvision.datasets.ImageFolder`` finds the files and decodes them, a
``torch.utils.data.DataLoader`` with ``num_workers`` processes runs the decoding and the PIL
transforms in parallel, and the batches arrive on ``device`` normalized, as
:class:`DeviceLoader`'s do. It has the same interface (``len``, ``epoch``, ``state_dict`` /
``load_state_dict``, ``set_epoch``, ``max_batches``, ``rank`` / ``world_size``), so the
training recipe drives either one.

Transforms (``torchvision.transforms``), the standard ImageNet ones:

* training with ``augment=True``: ``RandomResizedCrop(image_size)`` (scale 0.08..1, aspect ratio
  3/4..4/3) and ``RandomHorizontalFlip()``;
* evaluation (or ``augment=False``): ``Resize(round(image_size / 0.875))`` (the shorter side) and
  ``CenterCrop(image_size)``: 256 then 224 for ``image_size=224``;
* then ``ToTensor()`` and ``Normalize(mean, std)`` with ImageNet's channel statistics
  :data:`IMAGENET_MEAN` = (0.485, 0.456, 0.406) and :data:`IMAGENET_STD` = (0.229, 0.224, 0.225)
  (overridable: ``mean=``, ``std=``).

**Reproducible whatever the number of workers.** With ``num_workers > 0`` the images of a batch
are decoded by whichever worker process is free, and each worker has its own RNG; a transform
that draws from "the" random generator would then make the augmentation depend on the number of
workers and on scheduling, and a resumed run could not replay an epoch. Here the random choices
of image ``i`` (its dataset index) in epoch ``e`` are a function of ``(seed, e, i)`` only: the
sampler hands every worker ``(i, image_seed(seed, e, i))``, and the dataset wrapper runs the
transform under ``torch.random.fork_rng(devices=[])`` after seeding the CPU generator with that
value. The same image gets the same crop in epoch ``e`` with 0, 2 or 16 workers, in one process
or split over ``torchrun`` ranks, and the global torch RNG of the caller is left untouched. The
cost is one fork of the CPU RNG state (a 5 KB copy and restore) per training image, negligible
next to decoding a JPEG. ``image_seed`` hashes the triple (BLAKE2b, 64 bits) rather than doing
arithmetic on it, so no two (seed, epoch, index) triples share a stream however large they are.

The data order follows :class:`DeviceLoader`'s rule: the permutation of epoch ``e`` is drawn
from a CPU ``torch.Generator`` seeded with ``(seed, e)``, so ``state_dict()`` =
``{"seed", "epoch"}`` is all a resumed run needs to continue with exactly the batches the
uninterrupted run would have seen.

**Sharded.** With ``world_size > 1`` every rank draws the same permutation and takes positions
``rank, rank + W, ...`` of every global batch of ``batch_size`` images (``batch_size //
world_size`` each); all ranks run the same number of steps, and the union of the ranks' batches
at a step is one global batch.

Example:
    >>> train_set, val_set = image_folders("/data/imagenet")
    >>> train = FolderLoader(train_set, 256, image_size=224, shuffle=True, augment=True,
    ...                      num_workers=8, device="cuda")
    >>> for epoch in range(90):
    ...     for x, y in train: ...
    >>> probe = fixed_batch(val_set, 128, seed=0, device="cuda")   # held-out images, eval transform
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .loader import ShardedEpochs

__all__ = [
    "FolderLoader",
    "image_folders",
    "fixed_batch",
    "image_seed",
    "train_transform",
    "eval_transform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EVAL_CROP_FRACTION",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# evaluation resizes the shorter side to image_size / 0.875 and takes the central image_size crop
EVAL_CROP_FRACTION = 0.875


# --------------------------------------------------------------------------------------------------
# the folders


def image_folders(root: Union[str, Path]):
    """The training and held-out splits of an ImageNet-layout tree, as ``ImageFolder`` data sets.

    ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test/``). Classes are the
    training folder's sub-folders in sorted order (``ImageFolder``'s rule, and
    :func:`recipes.common.load_dataset`'s); the held-out split's labels use the same class indices,
    and it may lack classes but not have extra ones. Empty class folders count as classes, as in
    the in-memory loader. The data sets carry no transform: :class:`FolderLoader` adds its own.

    Returns:
        ``(train, val)``, two ``torchvision.datasets.ImageFolder``.
    """
    ImageFolder = _torchvision().datasets.ImageFolder
    if root is None:
        raise ValueError("imagefolder needs a data directory: the folder that holds train/<class>/* and val/<class>/*")
    root = Path(root).expanduser()
    train_dir = root / "train"
    val_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ (or test/)"
        raise ValueError(
            f"imagefolder expects {root}/train/<class>/* and {root}/val/<class>/* (or test/), but {missing} is "
            "missing: point the data directory at the folder that holds train/ and val/"
        )
    if not _subfolders(train_dir):
        raise ValueError(f"no class folders in {train_dir}: put each class's images in its own sub-folder, "
                         "train/<class>/*.jpg")
    extra = sorted(set(_subfolders(val_dir)) - set(_subfolders(train_dir)))
    if extra:
        raise ValueError(f"{val_dir} has classes that {train_dir} lacks: {extra[:5]}; the held-out split must "
                         "use the training split's class folders")
    splits = []
    for folder in (train_dir, val_dir):
        # ImageFolder itself refuses a folder without class folders; empty classes are allowed
        split = ImageFolder(str(folder), allow_empty=True) if _subfolders(folder) else []
        if not len(split):
            extensions = ", ".join(_torchvision().datasets.folder.IMG_EXTENSIONS)
            raise ValueError(f"imagefolder: no images in {folder}/<class>/ (looked for {extensions})")
        splits.append(split)
    train, val = splits
    _relabel(val, train.classes)
    return train, val


def _subfolders(folder: Path) -> List[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def _relabel(folder, classes: Sequence[str]) -> None:
    """Give ``folder`` (an ImageFolder) the class indices of ``classes`` (a superset of its own)."""
    to_index = {c: i for i, c in enumerate(classes)}
    own = folder.classes
    folder.samples = [(path, to_index[own[label]]) for path, label in folder.samples]
    folder.imgs = folder.samples
    folder.targets = [label for _, label in folder.samples]
    folder.classes, folder.class_to_idx = list(classes), dict(to_index)


def _torchvision():
    try:
        import torchvision
    except ImportError as err:
        raise ImportError("streaming image folders needs torchvision: pip install torchvision") from err
    return torchvision


# --------------------------------------------------------------------------------------------------
# transforms and seeds


def train_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``."""
    T = _torchvision().transforms
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """``Resize(round(image_size / 0.875))`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize``."""
    T = _torchvision().transforms
    return T.Compose([T.Resize(round(image_size / EVAL_CROP_FRACTION)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s random transform in epoch ``epoch``: 64 bits of BLAKE2b of the
    triple (collision-free in practice, unlike ``seed * A + epoch * B + index``, for any sizes)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _SeededImages(torch.utils.data.Dataset):
    """``dataset[(index, seed)]`` -> ``(transform(image), label)``, with the transform's random draws
    decided by ``seed`` alone (``None``: a deterministic transform, no RNG involved).

    The worker that runs this (or the main process with ``num_workers=0``) does not matter: the CPU
    generator is forked, seeded and restored around the transform. The object is stateless (the
    epoch's seeds travel with the keys), so nothing must be set on it before the DataLoader hands
    copies of it to its workers.
    """

    def __init__(self, folder, transform: Callable):
        self.samples = folder.samples  # (path, label) in ImageFolder's order
        self.load = folder.loader  # ImageFolder's decoder (PIL, RGB)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Tuple[int, Optional[int]]):
        index, seed = key
        path, label = self.samples[index]
        image = self.load(path)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            # not torch.manual_seed: that would also reseed every CUDA generator of the main process
            # (num_workers=0), which fork_rng(devices=[]) does not restore
            torch.random.default_generator.manual_seed(seed)
            return self.transform(image), label


# --------------------------------------------------------------------------------------------------
# the loader


class FolderLoader(ShardedEpochs):
    """Batches of decoded, transformed and normalized images from an ``ImageFolder``, on ``device``.

    Args:
        dataset: a ``torchvision.datasets.ImageFolder`` (or ``DatasetFolder``) without a transform,
            e.g. one of :func:`image_folders`.
        batch_size: images per step over all ranks (each rank gets ``batch_size // world_size``).
        image_size: side of the square images the transforms produce.
        shuffle: a new random order every epoch (training); ``False``: the data set's order.
        augment: ``RandomResizedCrop`` + flip; ``False``: resize + center crop (evaluation).
        mean, std: normalization (default: ImageNet's, :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`).
        indices: use only these images of ``dataset`` (e.g. a rank's share of the test split); the
            random transforms stay keyed by the index in ``dataset``.
        num_workers: DataLoader worker processes (0: decode in this process). The batches do not
            depend on it.
        drop_last: drop the last incomplete batch (default: ``shuffle``).
        seed: seed of the data order and of the augmentation.
        device: where the batches go (default: CPU); with CUDA the host buffers are pinned.
        rank, world_size: this process's shard (``torch.distributed``).
        max_batches: stop an epoch after this many batches (tests, quick runs).
        dtype: floating dtype of the batches.

    Iterating yields ``(x, y)`` for one epoch and then advances :attr:`epoch` by one.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        image_size: int = 224,
        shuffle: bool = False,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        indices: Optional[Sequence[int]] = None,
        num_workers: int = 4,
        drop_last: Optional[bool] = None,
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
        rank: int = 0,
        world_size: int = 1,
        max_batches: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
    ):
        _check_folder(dataset)
        _check_sizes(batch_size, rank, world_size, max_batches, num_workers, image_size)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need one value per RGB channel (3 each)")
        self.dataset = dataset
        self.indices = self._check_indices(indices, len(dataset))
        self.batch_size, self.local_batch_size = batch_size, batch_size // world_size
        self.image_size, self.shuffle, self.augment = int(image_size), shuffle, augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_workers = num_workers
        self.drop_last = shuffle if drop_last is None else drop_last
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.max_batches = max_batches
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.epoch = 0
        make = train_transform if augment else eval_transform
        self._images = _SeededImages(dataset, make(self.image_size, self.mean, self.std))
        self._pin = self.device.type == "cuda"  # page-locked host buffers: asynchronous copies

    @staticmethod
    def _check_indices(indices, n: int) -> torch.Tensor:
        if indices is None:
            return torch.arange(n)
        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.int64)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError("indices must be a non-empty 1-D sequence of image indices")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"indices must lie in [0, {n}) (the data set has {n} images)")
        return idx

    @property
    def num_images(self) -> int:
        """Images of the data set this loader draws from (all ranks together)."""
        return self.indices.numel()

    # -- iteration ---------------------------------------------------------------------------------

    def epoch_indices(self, epoch: Optional[int] = None) -> List[List[int]]:
        """Dataset indices of this rank's batches in epoch ``epoch`` (default: the next one)."""
        return [[i for i, _ in batch] for batch in self._plan(self.epoch if epoch is None else epoch)]

    def _plan(self, epoch: int) -> List[List[Tuple[int, Optional[int]]]]:
        """This rank's batches of the epoch as ``(index, image seed)`` keys for :class:`_SeededImages`.

        Made in the main process at the start of the epoch: about 1 us per image (about a second
        per epoch for ImageNet on one rank, less on each of several).
        """
        n = self.num_images
        positions = torch.randperm(n, generator=self.generator(epoch)) if self.shuffle else torch.arange(n)
        order = self.indices[positions].tolist()
        batches = []
        for b in range(len(self)):
            mine = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
            if not mine:
                break  # a rank's share of a short last batch can be empty (without drop_last)
            batches.append([(i, image_seed(self.seed, epoch, i) if self.augment else None) for i in mine])
        return batches

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        batches = self._plan(self.epoch)
        self.epoch += 1  # advanced up front: a checkpoint taken after this epoch resumes at the next
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            self._images,
            batch_sampler=batches,  # the epoch's batches, already cut to this rank and to max_batches
            num_workers=self.num_workers,
            pin_memory=self._pin,
            persistent_workers=False,
            # DataLoader draws its workers' base seed from this generator, not from the global RNG
            # (our transforms do not use the workers' seeds, but the caller's RNG stays untouched)
            generator=torch.Generator().manual_seed(self.seed),
        )
        for x, y in loader:
            yield (x.to(self.device, self.dtype, non_blocking=self._pin),
                   y.to(self.device, non_blocking=self._pin))


def fixed_batch(
    dataset,
    n: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out batch (curvature monitoring): ``n`` images of ``dataset`` chosen by a
    permutation seeded with ``seed``, with the evaluation transform, on ``device``.

    With ``world_size > 1`` this returns this rank's share, ``[rank::world_size]`` of the chosen
    images (the Hessian operator averages over the ranks); the choice is the in-memory recipe's
    (``torch.randperm(N, generator=Generator().manual_seed(seed))[:n]``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_folder(dataset)
    if not (0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    mine = chosen[rank::world_size]
    if mine.numel() == 0:
        raise ValueError(f"{n} held-out images leave none for rank {rank} of {world_size}: take at least {world_size}")
    loader = FolderLoader(dataset, mine.numel(), indices=mine, image_size=image_size, mean=mean, std=std,
                          num_workers=num_workers, device=device, dtype=dtype)
    return next(iter(loader))


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_folder(dataset) -> None:
    if not isinstance(dataset, _torchvision().datasets.DatasetFolder):
        raise TypeError(
            f"expected a torchvision.datasets.ImageFolder, got {type(dataset).__name__}; build the splits of a "
            "train/ + val/ tree with recipes.common.image_folders(root)"
        )
    if dataset.transform is not None or dataset.target_transform is not None:
        raise ValueError("FolderLoader applies its own (seeded) transforms: build the ImageFolder without transform")


def _check_sizes(batch_size, rank, world_size, max_batches, num_workers, image_size) -> None:
    ShardedEpochs.check_sharding(batch_size, rank, world_size, max_batches)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
