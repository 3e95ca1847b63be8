"""The image-classification recipe's checkpoint format: writing, verifying, reading, and analyzing it.

``checkpoint.pt`` is a plain ``torch.save`` zip archive (``torch.load`` reads it as it is) holding a
dict: ``model`` (state dict), ``optimizer``, ``scheduler``, ``loader`` (seed, epoch), ``rng``
(torch, CUDA, python, numpy), ``epoch``, ``step``, ``config`` (the options as given), ``resolved``
(every value used), ``model_args`` (the arguments of :func:`recipes.common.build_model`),
``dataset_args`` (what the held-out images are rebuilt from), ``metrics``, ``hessopt_version``.

**Integrity.** The zip archive's comment (the last bytes of the file, which zip readers and
``torch.load`` skip) holds ``hessopt-sha256:<hex>``, the SHA-256 of the archive as ``torch.save``
wrote it (comment length 0). :func:`read_checkpoint` recomputes it over every byte before
unpickling anything, so one flipped bit anywhere in the file is refused with a clear message
(``torch.load`` itself does not check the archive's CRCs). Checkpoints written before the checksum
existed load with a warning. Writing (:func:`save_checkpoint`) goes to ``checkpoint.pt.tmp``,
appends the checksum, ``fsync``s, ``os.replace``s and ``fsync``s the folder: a crash or a full disk
leaves the previous checkpoint as it was, and a failed write removes its partial file.

**Analysis** (the recipe-side adapter of ``hessopt analyze``): :func:`build_model` rebuilds the
network from a checkpoint and :func:`batches` gives its held-out images (a fixed random subset,
normalized as in training, without augmentation; ``--stream`` runs' ImageFolder trees through the
evaluation transform), so that

    hessopt analyze --model-fn recipes.image_classification.checkpoint:build_model \\
        --model-arg checkpoint=runs/digits/checkpoint.pt \\
        --data-fn recipes.image_classification.checkpoint:batches \\
        --data-arg checkpoint=runs/digits/checkpoint.pt --loss cross_entropy --out report/

works from the repository root; ``python recipes/image_classification/analyze.py CHECKPOINT --out
DIR`` does the same with the recipe's options (``--dataset``, ``--num-batches``, ...).
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # run as a script or imported by path: `recipes.common` lives at the root
    sys.path.insert(0, _ROOT)

__all__ = ["CheckpointError", "save_checkpoint", "read_checkpoint", "verify_checksum", "write_text_atomic",
           "checkpoint_config", "build_model", "batches", "analysis_subset", "RESUME_KEYS"]

PathLike = Union[str, "os.PathLike[str]"]

#: the keys --resume needs
RESUME_KEYS = ("model", "optimizer", "scheduler", "loader", "rng", "epoch", "step", "config", "resolved")

_EOCD = b"PK\x05\x06"  # zip end-of-central-directory signature; the record is 22 bytes + comment
_EOCD_SIZE = 22
_MAGIC = b"hessopt-sha256:"
_COMMENT_SIZE = len(_MAGIC) + 64


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (corrupt, truncated, foreign, disk full): the
    message says which file, what is wrong, and what to do."""


# --------------------------------------------------------------------------------------------------
# writing


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _append_checksum(tmp: Path) -> None:
    """Hash the archive ``torch.save`` wrote and store the digest as its zip comment, in place."""
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    with open(tmp, "r+b") as f:
        f.seek(-_EOCD_SIZE, os.SEEK_END)
        eocd = f.read(_EOCD_SIZE)
        if eocd[:4] != _EOCD or eocd[-2:] != b"\0\0":
            raise CheckpointError(f"{tmp}: torch.save wrote no plain zip archive; cannot add a checksum")
        f.seek(-2, os.SEEK_END)
        f.write(struct.pack("<H", _COMMENT_SIZE) + _MAGIC + digest.hexdigest().encode("ascii"))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically, with a SHA-256 checksum.

    ``torch.save`` to ``path.tmp``, the checksum appended as the archive's comment, ``fsync``, then
    ``os.replace`` and an ``fsync`` of the folder. On any failure (a full disk, a quota, an
    interrupt) the partial temporary file is removed and ``path`` keeps its previous content; write
    errors become a :class:`CheckpointError` that says so.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        _append_checksum(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CheckpointError):
            reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
            hint = " (the disk is full: free space, then rerun with --resume)" if (
                getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "write failed" in str(err)) else ""
            raise CheckpointError(
                f"cannot write the checkpoint {path}: {reason}{hint}; the partial file was removed and "
                f"{'the previous checkpoint is unchanged' if path.exists() else 'no checkpoint was written'}"
            ) from err
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, ``fsync`` and ``os.replace``: readers see
    the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------
# reading


def _resolve_path(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir():
        candidate = p / "checkpoint.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a directory without checkpoint.pt; pass the checkpoint file")
        p = candidate
    return p


def verify_checksum(path: PathLike) -> Optional[str]:
    """Check the SHA-256 that :func:`save_checkpoint` stored; returns the digest, or ``None`` for a
    checkpoint written before checksums existed. Raises :class:`CheckpointError` for an empty,
    truncated, non-zip or corrupted file."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): it was never completely written; start the run "
                              "again (--overwrite) or restore the checkpoint from a copy")
    with open(p, "rb") as f:
        n = min(size, _EOCD_SIZE + _COMMENT_SIZE)
        f.seek(size - n)
        tail = f.read(n)
    commented = len(tail) == _EOCD_SIZE + _COMMENT_SIZE and tail[:4] == _EOCD
    if commented and tail[-_COMMENT_SIZE - 2:-_COMMENT_SIZE] == struct.pack("<H", _COMMENT_SIZE) \
            and tail[-_COMMENT_SIZE:].startswith(_MAGIC):
        want = tail[-64:].decode("ascii", errors="replace")
        digest = hashlib.sha256()
        covered = size - _COMMENT_SIZE - 2  # everything but the comment and its length
        with open(p, "rb") as f:
            left = covered
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:  # pragma: no cover - the file shrank meanwhile
                    break
                digest.update(chunk)
                left -= len(chunk)
        digest.update(b"\0\0")  # the comment length torch.save wrote
        if digest.hexdigest() != want:
            raise CheckpointError(
                f"{p} is corrupted: its SHA-256 checksum does not match its content (a damaged disk, an "
                "incomplete copy, or the file was edited); restore it from a copy or start the run again")
        return want
    if tail[-_EOCD_SIZE:-_EOCD_SIZE + 4] == _EOCD and tail[-2:] == b"\0\0":
        warnings.warn(f"{p} has no checksum (written by an older version of the recipe): it is not verified",
                      RuntimeWarning, stacklevel=3)
        return None
    if commented or _MAGIC in tail:
        raise CheckpointError(f"{p} is truncated or corrupted: its checksum record at the end of the file is "
                              "damaged; restore it from a copy or start the run again")
    raise CheckpointError(f"{p} is not a complete PyTorch checkpoint ({size} bytes, no zip archive end): it is "
                          "truncated (the run was killed while copying or writing it?) or not a checkpoint at all")


def _numpy_globals() -> list:
    # The recipe stores NumPy's RNG state (an array) for bit-exact resumption; these are NumPy's
    # array/dtype reconstructors, which rebuild plain data and run no user code.
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int64, np.float32, np.float64)]
    return allowed


def read_checkpoint(path: PathLike, *, require: Sequence[str] = ("model",), map_location: Any = "cpu",
                    trust: bool = False) -> Dict[str, Any]:
    """Verify and load a recipe checkpoint (a file, or a run folder holding ``checkpoint.pt``).

    The checksum is checked first (:func:`verify_checksum`); then the file is unpickled with
    ``weights_only=True`` (tensors, containers, NumPy's RNG arrays); ``trust=True`` allows full
    unpickling of a file the safe loader refuses (only for files you trust). Every failure
    (missing, empty, truncated, garbage, corrupted, foreign, missing ``require`` keys) is a
    :class:`CheckpointError` that names the file and says what to do.
    """
    p = _resolve_path(path)
    verify_checksum(p)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(p, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if refused and not trust:
            raise CheckpointError(
                f"{p} holds objects the safe loader refuses ({refused[0][:200]}); if you trust the file, "
                "load it with trust=True (analyze.py: --trust-checkpoint)") from err
        raise CheckpointError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, AttributeError,
            UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {str(err)[:300]})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p} is not a checkpoint of the image-classification recipe: it holds a "
                              f"{type(ckpt).__name__}, not a dict with {', '.join(require)}")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{p} is not a checkpoint of the image-classification recipe: it lacks {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, sorted(map(str, ckpt))[:12]))})")
    if "model" in require and not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{p}: 'model' should be a state dict, got {type(ckpt['model']).__name__}")
    return ckpt


# --------------------------------------------------------------------------------------------------
# analysis: the model and the held-out batches of a checkpoint


def checkpoint_config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The run's settings: ``resolved`` (all defaults filled in) over ``config`` (as given), with
    ``model_args`` / ``dataset_args`` (what the model and data were built from) taking precedence."""
    config: Dict[str, Any] = {}
    for key in ("config", "resolved"):
        part = ckpt.get(key)
        if part is not None and not isinstance(part, dict):
            part = dict(vars(part)) if hasattr(part, "__dict__") else None
        if part:
            config.update({k: v for k, v in part.items() if v is not None})
    model_args = ckpt.get("model_args")
    if isinstance(model_args, dict):
        for src, dst in (("name", "model"), ("batchnorm", "batchnorm"), ("residual", "residual"),
                         ("num_classes", "num_classes"), ("in_chans", "in_chans")):
            if model_args.get(src) is not None:
                config[dst] = model_args[src]
    dataset_args = ckpt.get("dataset_args")
    if isinstance(dataset_args, dict):
        if dataset_args.get("name"):
            config["dataset"] = dataset_args["name"]
        if dataset_args.get("data_dir"):
            config["data_dir"] = dataset_args["data_dir"]
        for key in ("stream", "image_size", "mean", "std"):  # streamed runs: how the images were read
            if dataset_args.get(key) is not None:
                config[key] = dataset_args[key]
    return config


def _state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    # checkpoints of torch.compile'd or DDP-wrapped models prefix every key
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_CACHE: Dict[Tuple[str, int, int, bool], Dict[str, Any]] = {}


def _load(checkpoint: Union[PathLike, Dict[str, Any]], trust: bool = False) -> Dict[str, Any]:
    """A checkpoint dict, read once per file version (build_model and batches both need it)."""
    if isinstance(checkpoint, dict):
        return checkpoint
    p = _resolve_path(checkpoint)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, trust)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = read_checkpoint(p, trust=trust)
    return _CACHE[key]


class _Dataset:
    """The held-out images a checkpoint is analyzed on: in memory, or an ImageFolder tree streamed."""

    def __init__(self, config: Dict[str, Any], dataset: Optional[str], data_dir: Optional[str],
                 cache_dir: Optional[str], stream: bool, image_size: Optional[int]):
        from recipes import common

        name = dataset or config.get("dataset")
        if not name:
            raise CheckpointError("the checkpoint's config does not name the dataset: pass dataset=NAME (--dataset)")
        same = name == config.get("dataset")
        if dataset and config.get("dataset") and not same:
            print(f"note: dataset {dataset} differs from the checkpoint's dataset {config.get('dataset')!r}",
                  file=sys.stderr)
        if data_dir is None and same:
            data_dir = config.get("data_dir")
            if data_dir and not os.path.exists(str(data_dir)):
                data_dir = None  # trained elsewhere (e.g. on a GPU machine): the dataset's default location
        self.name, self.config = name, (config if same else {})
        if stream and name != "imagefolder":
            raise CheckpointError(f"--stream reads ImageFolder trees: it needs --dataset imagefolder, not {name!r}")
        self.streamed = name == "imagefolder" and (stream or bool(self.config.get("stream")))
        if self.streamed:
            if not data_dir:
                raise CheckpointError("--stream needs --data-dir: the folder that holds train/<class>/* and val/<class>/*")
            try:
                _, self.val = common.image_folders(data_dir)
            except (ValueError, OSError, ImportError) as err:
                raise CheckpointError(f"cannot read the image folders in {data_dir}: {err}") from err
            self.num_classes, self.in_chans = len(self.val.classes), 3
            self.image_size = int(image_size or self.config.get("image_size") or 224)
            self.mean = tuple(self.config.get("mean") or common.IMAGENET_MEAN)
            self.std = tuple(self.config.get("std") or common.IMAGENET_STD)
            return
        if name not in common.DATASETS:
            raise CheckpointError(f"unknown dataset {name!r}; choose one of {', '.join(common.DATASETS)}")
        try:
            self.data = common.load_dataset(name, data_dir=data_dir, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CheckpointError(f"cannot load dataset {name!r}" + (f" from {data_dir}" if data_dir else "")
                                  + f": {err}") from err
        self.num_classes, self.in_chans = self.data.num_classes, self.data.in_chans

    def batches(self, batch_size: int, num_batches: int, seed: int, device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        from recipes.common import DeviceLoader, FolderLoader

        if self.streamed:  # the same subset rule, decoded with the evaluation transform
            idx = analysis_subset(len(self.val), batch_size * num_batches, seed)
            return list(FolderLoader(self.val, batch_size, indices=idx, image_size=self.image_size, mean=self.mean,
                                     std=self.std, num_workers=0, device=device))
        data = self.data
        idx = analysis_subset(data.test_x.shape[0], batch_size * num_batches, seed)
        return list(DeviceLoader(data.test_x[idx], data.test_y[idx], batch_size, data.mean, data.std,
                                 shuffle=False, augment=False, drop_last=False, device=device))


def analysis_subset(num_images: int, count: int, seed: int) -> torch.Tensor:
    """Indices of the analyzed test images: a fixed random subset (data sets stored class by class,
    like CIFAR-10's JPEG folders, would give one class if the first images were taken)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[: min(count, num_images)]


def build_model(checkpoint: Union[PathLike, Dict[str, Any]], model: Optional[str] = None,
                dataset: Optional[str] = None, data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                stream: bool = False, image_size: Optional[int] = None, trust: bool = False) -> nn.Module:
    """The network of a recipe checkpoint, weights loaded (CPU; ``hessopt analyze --device`` moves it).

    ``model`` overrides the name the checkpoint records; the number of classes and input channels
    come from the checkpoint's ``model_args`` (older checkpoints: from ``dataset``, loaded for it).
    """
    from recipes import common

    ckpt = _load(checkpoint, trust)
    config = checkpoint_config(ckpt)
    name = model or config.get("model")
    if not name:
        raise CheckpointError("the checkpoint's config does not name the model: pass model=NAME (--model)")
    if config.get("num_classes") is not None and config.get("in_chans") is not None and not dataset:
        num_classes, in_chans, what = int(config["num_classes"]), int(config["in_chans"]), "the checkpoint's"
    else:
        data = _Dataset(config, dataset, data_dir, cache_dir, stream, image_size)
        num_classes, in_chans, what = data.num_classes, data.in_chans, f"dataset {data.name!r}'s"
        for key, have in (("num_classes", num_classes), ("in_chans", in_chans)):
            if config.get(key) is not None and int(config[key]) != have and not model:
                raise CheckpointError(
                    f"the checkpoint's model has {key}={config[key]} but dataset {data.name!r} has {have}: "
                    f"pass the dataset it was trained on (the checkpoint says {config.get('dataset')!r})")
    kwargs = dict(batchnorm=bool(config.get("batchnorm", True)), residual=bool(config.get("residual", True)))
    try:
        net = common.build_model(name, num_classes, in_chans=in_chans, **kwargs)
    except (ValueError, ImportError, TypeError) as err:
        raise CheckpointError(f"cannot build model {name!r}: {err}") from err
    try:
        net.load_state_dict(_state_dict(ckpt["model"]))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"the checkpoint's weights do not fit {name!r} ({kwargs}) with {what} {num_classes} classes and "
            f"{in_chans} input channels (is the dataset the one it was trained on?): {first}") from err
    return net


def batches(checkpoint: Union[PathLike, Dict[str, Any]], dataset: Optional[str] = None,
            data_dir: Optional[str] = None, cache_dir: Optional[str] = None, stream: bool = False,
            image_size: Optional[int] = None, batch_size: int = 128, num_batches: int = 4, seed: int = 0,
            device: Any = "cpu", trust: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` batches of ``batch_size`` held-out images of a checkpoint's data set.

    A fixed random subset of the test (``val/``) split chosen by ``seed``, normalized with the
    training set's mean and standard deviation as in training, without augmentation; checkpoints
    of ``--stream`` runs (or ``stream=True``) read ImageFolder trees through the evaluation
    transform (resize, center crop). ``dataset`` / ``data_dir`` default to the checkpoint's.
    """
    for key, value in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{key} must be a positive integer, got {value!r}")
    ckpt = _load(checkpoint, trust)
    data = _Dataset(checkpoint_config(ckpt), dataset, data_dir, cache_dir, stream, image_size)
    return data.batches(batch_size, num_batches, seed, torch.device(device))
