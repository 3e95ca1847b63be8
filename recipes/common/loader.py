r"""A data loader that lives on the device: uint8 images there, batches normalized and augmented there.

For small images a ``torch.utils.data.DataLoader`` with PIL transforms is the bottleneck of a GPU
run (decoding, per-image Python transforms, host-to-device copies). :class:`DeviceLoader` keeps the
uint8 images on the device (CIFAR-10: 180 MB), and per batch gathers the indices, applies the
standard CIFAR augmentation (random crop of the zero-padded image, padding 4, and a horizontal flip
with probability 1/2; He et al. 2016) as tensor indexing, and normalizes with the per-channel mean
and standard deviation. Nothing runs per image in Python.

**Reproducible and resumable.** The random choices of an epoch (the permutation, the crop offsets
and the flips of every image) are drawn at the start of the epoch from an explicit CPU
``torch.Generator`` seeded with ``(seed, epoch)``: the data order does not depend on the global RNG,
is the same on CPU and GPU, and a run resumed from ``state_dict()`` (``{"seed", "epoch"}``)
continues with exactly the batches the uninterrupted run would have seen.

**Sharded.** With ``world_size > 1`` (``torchrun``), every rank draws the same permutation and
takes every ``world_size``-th index of it (rank ``r``: positions ``r, r + W, ...``), each rank gets
``batch_size // world_size`` images per step, and all ranks run the same number of steps; the
union of the ranks' batches at a step is one global batch of ``batch_size`` images.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["DeviceLoader", "ShardedEpochs"]


class ShardedEpochs:
    """The epoch bookkeeping :class:`DeviceLoader` and :class:`recipes.common.FolderLoader` share:
    sizes, the ``{"seed", "epoch"}`` state and the per-epoch generator.

    Subclasses set ``batch_size``, ``local_batch_size``, ``drop_last``, ``seed``, ``epoch``,
    ``rank``, ``world_size``, ``max_batches`` and provide :attr:`num_images`.
    """

    batch_size: int
    local_batch_size: int
    drop_last: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    max_batches: Optional[int]

    @staticmethod
    def check_sharding(batch_size: int, rank: int, world_size: int, max_batches: Optional[int]) -> None:
        """Raise a ValueError for a batch size, shard or batch limit the loaders cannot honour."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the number of processes {world_size}: "
                "every rank must get the same number of images per step"
            )
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be None or positive, got {max_batches!r}")

    @property
    def num_images(self) -> int:
        """Images the loader draws from (all ranks together)."""
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        """Images this rank sees per full epoch (before ``max_batches``)."""
        n = self.num_images
        if self.world_size == 1:
            return n
        if self.drop_last:
            return (n // self.batch_size) * self.local_batch_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        batches = full if self.drop_last or rest == 0 else full + 1
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def state_dict(self) -> Dict[str, int]:
        """``{"seed", "epoch"}``: everything that decides the next epoch's batches."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, epoch: Optional[int] = None) -> torch.Generator:
        """The CPU generator whose draws decide epoch ``epoch`` (default: the next one)."""
        epoch = self.epoch if epoch is None else epoch
        # distinct, fixed streams per (seed, epoch); 2**31 - 1 is a prime larger than any epoch count
        return torch.Generator().manual_seed(self.seed * 2_147_483_647 + epoch)


class DeviceLoader(ShardedEpochs):
    """Batches of normalized (and optionally augmented) images from uint8 tensors on a device.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)`` (moved to ``device`` once).
        labels: ``int64`` tensor ``(N,)``.
        batch_size: images per step over all ranks (each rank gets ``batch_size // world_size``).
        mean, std: per-channel normalization in ``[0, 1]`` units (``ImageData.mean``/``std``).
        shuffle: a new random order every epoch (training); ``False``: data order (evaluation).
        augment: random crop with ``pad`` pixels of zero padding and a horizontal flip.
        pad: crop padding (4 for 32x32 CIFAR).
        flip: horizontal flips (turn off for data where mirror images differ, e.g. digits).
        drop_last: drop the last incomplete batch (default: ``shuffle``).
        seed: seed of the per-epoch generator.
        device: where images and batches live (default: the images' device).
        rank, world_size: this process's shard (``torch.distributed``).
        max_batches: stop an epoch after this many batches (tests, quick runs).
        dtype: floating dtype of the batches.

    Iterating yields ``(x, y)`` for one epoch and then advances :attr:`epoch` by one.

    Example:
        >>> data = recipes.common.load_dataset("cifar10")
        >>> train = DeviceLoader(data.train_x, data.train_y, 256, data.mean, data.std,
        ...                      shuffle=True, augment=True, device="cuda")
        >>> for x, y in train: ...
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool = False,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        drop_last: Optional[bool] = None,
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
        rank: int = 0,
        world_size: int = 1,
        max_batches: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor of shape (N, C, H, W)")
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},)")
        self.check_sharding(batch_size, rank, world_size, max_batches)
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need one value per channel ({c})")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.shuffle, self.augment, self.pad, self.flip = shuffle, augment, int(pad), flip
        self.drop_last = shuffle if drop_last is None else drop_last
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.max_batches = max_batches
        self.dtype = dtype
        self.epoch = 0
        shape = (1, c, 1, 1)
        self._mean = torch.tensor(mean, dtype=dtype, device=self.device).view(shape)
        self._inv_std = 1.0 / torch.tensor(std, dtype=dtype, device=self.device).view(shape)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    # -- iteration ---------------------------------------------------------------------------------

    def _epoch_plan(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        n = self.images.shape[0]
        if not self.shuffle and not self.augment:
            return torch.arange(n), None, None
        gen = self.generator()
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:  # per image (indexed by image id), so the draws do not depend on sharding
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
        return order, offsets, flips

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._epoch_plan()
        n = order.numel()
        if self.drop_last:
            n = (n // self.batch_size) * self.batch_size
        order = order[:n].to(self.device)
        if offsets is not None:
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        self.epoch += 1  # advanced up front: a checkpoint taken after this epoch resumes at the next
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx = idx[self.rank :: self.world_size]
            if idx.numel() == 0:
                return
            yield self._batch(idx, offsets, flips)

    def _batch(self, idx, offsets, flips) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx]
        if offsets is not None:
            x = self._crop_flip(x, offsets[idx], flips[idx])
        x = x.to(self.dtype).div_(255.0).sub_(self._mean).mul_(self._inv_std)
        return x, self.labels[idx]

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.pad > 0:
            x = F.pad(x, (self.pad,) * 4)  # zero (black) padding, as torchvision's RandomCrop(padding=4)
            rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
            if self.flip:
                cols = torch.where(flips[:, None], cols.flip(1), cols)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = x[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
            return x.permute(0, 3, 1, 2).contiguous()
        if self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        return x
