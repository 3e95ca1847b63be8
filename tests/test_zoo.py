"""recipes.common (the recipes' models and data): models, data sets (on tiny synthetic copies) and the on-device loader."""
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recipes.common import CIFAR10_CLASSES, DeviceLoader, ImageData, build_model, load_dataset
from recipes.common import data as zoo_data
from recipes.common.models import CifarResNet, _ZeroPadShortcut

PIL = pytest.importorskip("PIL.Image")



# --------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("name,blocks", [("cifar_resnet20", 3), ("cifar_resnet32", 5), ("cifar_resnet38", 6), ("cifar_resnet56", 9)])
def test_cifar_resnets_shapes_and_depth(name, blocks):
    model = build_model(name, num_classes=10)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 6 * blocks + 2  # option A: shortcuts have no weights
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    grey = build_model(name, num_classes=7, in_chans=1)
    assert grey(torch.randn(3, 1, 8, 8)).shape == (3, 7)


def test_resnet20_has_the_papers_parameter_count():
    # He et al. 2016, Table 6: ResNet20 has 0.27M parameters (option A shortcuts)
    n = sum(p.numel() for p in build_model("cifar_resnet20", 10).parameters())
    assert n == 269_722


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = _ZeroPadShortcut(16, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))
    b = CifarResNet(20, shortcut="B")
    assert b(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_batchnorm_switch_removes_norm_layers_and_adds_biases():
    model = build_model("cifar_resnet20", 10, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    with_bn = build_model("cifar_resnet20", 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 19
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model("digits_cnn", 10, 1, batchnorm=False).modules())


def test_residual_switch_builds_a_plain_network():
    torch.manual_seed(0)
    plain = build_model("cifar_resnet20", 10, residual=False)
    assert not any(isinstance(m, _ZeroPadShortcut) for m in plain.modules())
    torch.manual_seed(0)
    res = build_model("cifar_resnet20", 10, residual=True)
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), res.eval()
    # same weights (same seed, same parameter shapes), different function
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), res.parameters()))
    assert not torch.allclose(plain(x), res(x))


def test_residual_network_without_batchnorm_has_a_bounded_initial_signal():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    for depth in (20, 56):
        out = build_model(f"cifar_resnet{depth}", 10, batchnorm=False)(x)
        assert torch.isfinite(out).all() and out.std() < 10


def test_model_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("cifar_resnet21", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cifar_resnet20", 0)
    with pytest.raises(TypeError, match="non-empty string"):
        build_model("", 10)
    with pytest.raises(ValueError, match="zoo's CIFAR ResNets"):
        build_model("resnet18", 10, batchnorm=False)


def test_other_names_go_to_timm():
    pytest.importorskip("timm")
    model = build_model("resnet18", num_classes=5, in_chans=1)
    assert type(model).__module__.startswith("timm.")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        build_model("no_such_net", 10)


def test_timm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"hessopt\[timm\]"):
        build_model("resnet18", 10)


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_fixed_stratified_and_complete():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert isinstance(data, ImageData) and data.name == "digits"
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (1, 8, 8)
    assert data.train_y.dtype == torch.int64
    assert len(data.train_y) + len(data.test_y) == 1797
    counts = torch.bincount(data.test_y, minlength=10)
    totals = torch.bincount(torch.cat([data.train_y, data.test_y]), minlength=10)
    assert torch.equal(counts, (totals + 4) // 5)  # every 5th image of each class
    assert (data.num_classes, data.in_chans) == (10, 1)
    ref = load_digits()
    assert int(data.train_x.max()) == 255 and torch.equal(data.test_x[0, 0], torch.from_numpy(np.rint(ref.images[0] * 255 / 16).astype(np.uint8)))
    again = load_dataset("digits")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_channel_stats_match_a_direct_computation():
    x = torch.randint(0, 256, (20, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = zoo_data._channel_stats(x)
    f = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), f.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), f.std((0, 2, 3), unbiased=False), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 on tiny synthetic copies


def _images(n, seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _write_png(path: Path, chw: np.ndarray, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(chw.transpose(1, 2, 0)).save(path, format=fmt)


def _make_folders(root: Path, per_class=2):
    """train/<class>/*.png and test/<class>/*.png for 3 classes; returns the expected arrays (sorted order)."""
    expected = {}
    for split, seed in (("train", 1), ("test", 2)):
        xs, ys = [], []
        for label in (0, 3, 9):
            imgs = _images(per_class, seed * 100 + label)
            for i, img in enumerate(imgs):
                _write_png(root / split / CIFAR10_CLASSES[label] / f"{i:04d}.png", img)
            xs.append(imgs)
            ys += [label] * per_class
        expected[split] = (np.concatenate(xs), np.array(ys))
    return expected


def test_cifar10_from_torchvision_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_parts = []
    for i in range(1, 6):
        x, y = _images(3, i), [i % 10, (i + 1) % 10, (i + 2) % 10]
        train_parts.append((x, y))
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x.reshape(3, -1), b"labels": y}, f)
    tx = _images(4, 9)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": tx.reshape(4, -1), b"labels": [0, 1, 2, 3]}, f)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_x.shape == (15, 3, 32, 32) and data.num_classes == 10 and data.in_chans == 3
    assert torch.equal(data.train_x, torch.from_numpy(np.concatenate([p[0] for p in train_parts])))
    assert data.train_y.tolist() == sum((p[1] for p in train_parts), [])
    assert torch.equal(data.test_x, torch.from_numpy(tx)) and data.test_y.tolist() == [0, 1, 2, 3]
    assert data.classes == CIFAR10_CLASSES


def test_cifar10_from_folders_uses_the_standard_label_order_and_caches(tmp_path, monkeypatch):
    expected = _make_folders(tmp_path / "c10")
    cache = tmp_path / "cache"
    data = load_dataset("cifar10", str(tmp_path / "c10"), cache_dir=str(cache))
    assert torch.equal(data.train_x, torch.from_numpy(expected["train"][0]))  # PNG: lossless
    assert data.train_y.tolist() == expected["train"][1].tolist()
    assert torch.equal(data.test_x, torch.from_numpy(expected["test"][0]))
    assert len(list(cache.glob("*.npy"))) == 4 and not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(zoo_data, "_read_cifar_folders", no_decoding)
    cached = load_dataset("cifar10", str(tmp_path / "c10"), cache_dir=str(cache))
    assert torch.equal(cached.train_x, data.train_x) and torch.equal(cached.test_y, data.test_y)
    assert cached.mean == data.mean


def test_cifar10_from_a_jpeg_archive_stream(tmp_path):
    src = tmp_path / "src" / "cifar10-jpeg"
    expected = _make_folders(src)
    for p in src.rglob("*.png"):  # the real archive holds JPEGs
        with PIL.open(p) as im:
            im.save(p.with_suffix(".jpg"), format="JPEG", quality=95)
        p.unlink()
    archive = tmp_path / "data" / "cifar10-jpeg.tar.xz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src, arcname="cifar10-jpeg")
    from_file = load_dataset("cifar10", str(archive), cache_dir=str(tmp_path / "cache"))
    from_dir = load_dataset("cifar10", str(archive.parent), cache_dir=str(tmp_path / "cache2"))
    assert from_file.train_x.shape == (6, 3, 32, 32) and from_file.test_x.shape == (6, 3, 32, 32)
    assert torch.equal(from_file.train_x, from_dir.train_x)
    assert from_file.train_y.tolist() == expected["train"][1].tolist()
    # the same pixels as Pillow decoding the files one by one, in (class, file name) order
    files = sorted(src.glob("train/*/*.jpg"), key=lambda p: (CIFAR10_CLASSES.index(p.parent.name), p.name))
    reference = np.stack([np.asarray(PIL.open(p).convert("RGB")).transpose(2, 0, 1) for p in files])
    assert torch.equal(from_file.train_x, torch.from_numpy(reference))


def test_cifar10_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no CIFAR-10 found"):
        load_dataset("cifar10", str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .tar"):
        load_dataset("cifar10", str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_dataset("mnist")


REAL_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="the shared CIFAR-10 archive is not beside this checkout")
def test_first_members_of_the_real_archive_decode():
    items = list(zoo_data.iter_archive_images(REAL_ARCHIVE, limit=5))
    assert len(items) == 5
    for (split, label, name), img in items:
        assert split in ("train", "test") and 0 <= label < 10 and name.endswith(".jpg")
        assert img.shape == (3, 32, 32) and img.dtype == np.uint8


# --------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_reads_train_and_val(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "ant"):
            for i in range(n):
                _write_png(tmp_path / split / c / f"{i}.png", _images(1, hash((split, c, i)) % 1000, size=12)[0])
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.classes == ("ant", "cat")  # sorted, as torchvision's ImageFolder
    assert data.train_x.shape == (6, 3, 12, 12) and data.test_x.shape == (4, 3, 12, 12)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_limits_are_explicit(tmp_path, monkeypatch):
    _write_png(tmp_path / "train" / "a" / "0.png", _images(1, 0, size=8)[0])
    _write_png(tmp_path / "train" / "a" / "1.png", _images(1, 1, size=10)[0])
    _write_png(tmp_path / "val" / "a" / "0.png", _images(1, 2, size=8)[0])
    with pytest.raises(ValueError, match="different sizes"):
        load_dataset("imagefolder", str(tmp_path))
    monkeypatch.setenv("HESSOPT_MAX_IMAGEFOLDER_GB", "1e-9")
    with pytest.raises(ValueError, match="in memory"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("imagefolder")


# --------------------------------------------------------------------------------------------------
# DeviceLoader


def _toy(n=10, c=3, h=6, w=5):
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return x, torch.arange(n) % 3


def test_loader_normalizes_in_data_order_without_shuffle():
    x, y = _toy()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    batches = list(DeviceLoader(x, y, 4, mean, std))
    assert [len(b[1]) for b in batches] == [4, 4, 2]  # drop_last defaults to shuffle (False here)
    got = torch.cat([b[0] for b in batches])
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_loader_augmentation_matches_a_per_image_reference():
    x, y = _toy()
    loader = DeviceLoader(x, y, 10, (0.0,) * 3, (1.0,) * 3, shuffle=True, augment=True, pad=2, seed=3)
    gen = loader.generator(0)
    order = torch.randperm(10, generator=gen)
    offsets = torch.randint(0, 5, (10, 2), generator=gen)
    flips = torch.rand(10, generator=gen) < 0.5
    (xb, yb), = list(loader)
    for j, i in enumerate(order.tolist()):
        img = F.pad(x[i], (2, 2, 2, 2))
        oy, ox = offsets[i].tolist()
        crop = img[:, oy : oy + 6, ox : ox + 5]
        if flips[i]:
            crop = crop.flip(2)
        assert torch.allclose(xb[j], crop.float() / 255), j
        assert yb[j] == y[i]
    assert flips.any() and not flips.all()


def test_loader_order_is_reproducible_and_resumable():
    x, y = _toy(n=40)
    make = lambda: DeviceLoader(x, y, 8, (0.5,) * 3, (0.5,) * 3, shuffle=True, augment=True, seed=7)
    a = make()
    epochs = [[b[1].clone() for b in a] for _ in range(3)]
    assert not all(torch.equal(p, q) for p, q in zip(epochs[0], epochs[1]))  # a new order every epoch
    b = make()
    list(b)
    state = b.state_dict()
    assert state == {"seed": 7, "epoch": 1}
    c = make()
    c.load_state_dict(state)
    resumed = [[bb[1].clone() for bb in c] for _ in range(2)]
    assert all(torch.equal(p, q) for e1, e2 in zip(epochs[1:], resumed) for p, q in zip(e1, e2))
    other_seed = DeviceLoader(x, y, 8, (0.5,) * 3, (0.5,) * 3, shuffle=True, seed=8)
    assert not all(torch.equal(p, q[1]) for p, q in zip(epochs[0], other_seed))


def test_loader_shards_make_up_the_global_batch():
    x, y = _toy(n=26)
    full = DeviceLoader(x, y, 8, (0.0,) * 3, (1.0,) * 3, shuffle=True, augment=True, seed=1)
    shards = [DeviceLoader(x, y, 8, (0.0,) * 3, (1.0,) * 3, shuffle=True, augment=True, seed=1, rank=r, world_size=2)
              for r in range(2)]
    full_batches = list(full)
    per_rank = [list(s) for s in shards]
    assert len(full_batches) == len(per_rank[0]) == len(per_rank[1]) == 3  # drop_last with shuffle
    for g, (a, b) in zip(full_batches, zip(*per_rank)):
        assert a[0].shape[0] == b[0].shape[0] == 4
        merged = torch.stack([a[0], b[0]], 1).flatten(0, 1)  # rank r holds positions r, r+2, ...
        assert torch.equal(merged, g[0])


def test_loader_max_batches_and_errors():
    x, y = _toy(n=40)
    loader = DeviceLoader(x, y, 8, (0.0,) * 3, (1.0,) * 3, shuffle=True, max_batches=2)
    assert len(loader) == 2 and len(list(loader)) == 2 and loader.epoch == 1
    with pytest.raises(TypeError, match="uint8"):
        DeviceLoader(x.float(), y, 8, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="not divisible"):
        DeviceLoader(x, y, 9, (0.0,) * 3, (1.0,) * 3, world_size=2, rank=0)
    with pytest.raises(ValueError, match="one value per channel"):
        DeviceLoader(x, y, 8, (0.0,), (1.0,))
