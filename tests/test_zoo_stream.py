"""recipes.common.stream (FolderLoader) on tiny ImageFolder trees, the recipe's --stream, and its analysis
(recipes/image_classification/analyze.py) on it.

The trees hold images of two sizes (WxH 20x24 and 30x18), which the in-memory loader refuses; the
oracles are torchvision's own transforms applied to the files, and the loader's own runs under
other settings (workers, sharding, resume) for the bit-exact guarantees.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from recipes.image_classification.analyze import main as cli_main  # noqa: E402
from recipes.image_classification.checkpoint import analysis_subset  # noqa: E402
from recipes.common import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, build_model, fixed_batch, image_folders  # noqa: E402
from recipes.common.stream import image_seed  # noqa: E402

CLASSES = ("ant", "bee", "cat")  # written in another order below; ImageFolder sorts them
SIZE = 16


def _write_tree(root: Path, train_per_class=8, val_per_class=3, val_classes=CLASSES) -> Path:
    rng = np.random.default_rng(0)
    for split, n, classes in (("train", train_per_class, CLASSES), ("val", val_per_class, val_classes)):
        for c in reversed(classes):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = (20, 24) if i % 2 else (30, 18)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                # JPEG for training (what --stream is for), PNG for validation
                Image.fromarray(pixels).save(folder / (f"{i}.jpg" if split == "train" else f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def splits(tree):
    return image_folders(tree)


def _normalize():
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _rgb(path):
    with Image.open(path) as img:
        return img.convert("RGB")


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _loader(dataset, batch_size=8, **kwargs):
    kwargs = {"image_size": SIZE, "num_workers": 0, **kwargs}
    return FolderLoader(dataset, batch_size, **kwargs)


# --------------------------------------------------------------------------------------------------
# batches, labels, transforms


def test_training_batches_have_the_right_shape_labels_and_augmentation(tree, splits):
    train, _ = splits
    reference = ImageFolder(str(tree / "train"))  # torchvision's own class order
    assert train.classes == list(CLASSES) == reference.classes
    loader = _loader(train, shuffle=True, augment=True, seed=3)
    planned = loader.epoch_indices()
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 3 and loader.epoch == 1
    drawn = [i for batch in planned for i in batch]
    assert sorted(drawn) == list(range(24)) and drawn != list(range(24))  # a permutation of all images
    augment = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), *_normalize()])
    for (x, y), indices in zip(batches, planned):
        assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
        paths = [Path(train.samples[i][0]) for i in indices]
        assert y.tolist() == [reference.class_to_idx[p.parent.name] for p in paths]
        # the documented contract: image i of epoch e is transformed under the seed (seed, e, i)
        for row, i, path in zip(x, indices, paths):
            torch.manual_seed(image_seed(3, 0, i))
            assert torch.equal(row, augment(_rgb(path)))


def test_an_unshuffled_eval_loader_is_torchvisions_transform_of_the_files_in_order(tree, splits):
    _, val = splits
    loader = _loader(val, batch_size=4)  # 9 images: batches of 4, 4, 1 (no drop_last without shuffle)
    batches = _epoch(loader)
    assert [len(y) for _, y in batches] == [4, 4, 1]
    files = [(p, label) for label, c in enumerate(CLASSES) for p in sorted((tree / "val" / c).iterdir())]
    # image_size / 0.875 = 18.3 -> resize the shorter side to 18, then the central 16x16
    reference = T.Compose([T.Resize(18), T.CenterCrop(SIZE), *_normalize()])
    expected_x = torch.stack([reference(_rgb(p)) for p, _ in files])
    assert torch.equal(torch.cat([x for x, _ in batches]), expected_x)
    assert torch.cat([y for _, y in batches]).tolist() == [label for _, label in files]


def test_the_held_out_split_keeps_the_training_class_indices(tmp_path):
    root = _write_tree(tmp_path, train_per_class=1, val_per_class=1, val_classes=("ant", "cat"))
    _, val = image_folders(root)
    assert ImageFolder(str(root / "val")).targets == [0, 1]  # what val alone would say
    assert val.targets == [0, 2] and val.classes == list(CLASSES)
    assert torch.cat([y for _, y in _loader(val, batch_size=2)]).tolist() == [0, 2]


# --------------------------------------------------------------------------------------------------
# reproducibility, resume, sharding


def test_batches_do_not_depend_on_workers_and_follow_seed_and_epoch(splits):
    train, _ = splits
    kwargs = dict(shuffle=True, augment=True, seed=5)
    rng_before = torch.get_rng_state()
    serial = _loader(train, **kwargs)
    serial_epochs = [_epoch(serial), _epoch(serial)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    parallel = _loader(train, num_workers=2, **kwargs)
    assert _same(_epoch(parallel), serial_epochs[0]) and _same(_epoch(parallel), serial_epochs[1])
    assert _same(_epoch(_loader(train, **kwargs)), serial_epochs[0])  # same seed: same epoch
    other_seed = _epoch(_loader(train, shuffle=True, augment=True, seed=6))
    assert not torch.equal(other_seed[0][0], serial_epochs[0][0][0])
    assert not torch.equal(serial_epochs[1][0][0], serial_epochs[0][0][0])
    # same images in epoch 2, freshly augmented: no image has the same crop in both epochs
    plan = [serial.epoch_indices(e) for e in (0, 1)]
    first = dict(zip([i for b in plan[0] for i in b], torch.cat([x for x, _ in serial_epochs[0]])))
    second = dict(zip([i for b in plan[1] for i in b], torch.cat([x for x, _ in serial_epochs[1]])))
    assert first.keys() == second.keys() and not any(torch.equal(first[i], second[i]) for i in first)


def test_a_resumed_loader_continues_with_the_next_epoch(splits):
    train, _ = splits
    kwargs = dict(shuffle=True, augment=True, seed=1, max_batches=2)
    straight = _loader(train, **kwargs)
    _epoch(straight)
    state = straight.state_dict()
    assert state == {"seed": 1, "epoch": 1}
    epoch2 = _epoch(straight)
    assert len(epoch2) == 2  # max_batches
    resumed = _loader(train, **{**kwargs, "seed": 99})
    resumed.load_state_dict(state)
    assert _same(_epoch(resumed), epoch2) and resumed.state_dict() == {"seed": 1, "epoch": 2}
    jumped = _loader(train, **kwargs)
    jumped.set_epoch(1)
    assert _same(_epoch(jumped), epoch2)


def test_two_ranks_together_yield_the_global_batch(splits):
    train, _ = splits
    kwargs = dict(shuffle=True, augment=True, seed=2)
    whole = _epoch(_loader(train, **kwargs))
    shards = [_loader(train, rank=r, world_size=2, **kwargs) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3] and shards[0].num_samples == 12
    # DeviceLoader's rule: rank r takes positions r, r + W, ... of each global batch
    global_plan = _loader(train, **kwargs).epoch_indices()
    assert [s.epoch_indices() for s in shards] == [[b[r::2] for b in global_plan] for r in (0, 1)]
    parts = [_epoch(s) for s in shards]

    def rows(*batches):
        return sorted((x.numpy().tobytes(), int(y)) for xb, yb in batches for x, y in zip(xb, yb))

    assert all(len(p) == len(whole) for p in parts)
    for step, (x, y) in enumerate(whole):
        assert [len(p[step][1]) for p in parts] == [4, 4]
        assert rows(parts[0][step], parts[1][step]) == rows((x, y))


def test_fixed_batch_is_a_seeded_subset_with_the_eval_transform_split_over_ranks(splits):
    _, val = splits
    x, y = fixed_batch(val, 5, seed=4, image_size=SIZE)
    chosen = torch.randperm(len(val), generator=torch.Generator().manual_seed(4))[:5].tolist()
    reference = T.Compose([T.Resize(18), T.CenterCrop(SIZE), *_normalize()])
    assert torch.equal(x, torch.stack([reference(_rgb(val.samples[i][0])) for i in chosen]))
    assert y.tolist() == [val.targets[i] for i in chosen]
    shares = [fixed_batch(val, 5, seed=4, image_size=SIZE, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(shares[0][0], x[0::2]) and torch.equal(shares[1][0], x[1::2])


# --------------------------------------------------------------------------------------------------
# errors


def test_errors_say_what_to_do(tmp_path, splits):
    train, val = splits
    (tmp_path / "only_val" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train/ is missing"):
        image_folders(tmp_path / "only_val")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"val/ \(or test/\) is missing"):
        image_folders(tmp_path / "only_train")
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "test").mkdir()
    with pytest.raises(ValueError, match="no class folders in .*own sub-folder"):
        image_folders(tmp_path / "no_classes")
    extra = _write_tree(tmp_path / "extra", train_per_class=1, val_per_class=1)
    (extra / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"classes that .* lacks: \['dog'\]"):
        image_folders(extra)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        image_folders(empty)
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        _loader(train, batch_size=8, world_size=3)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        _loader(train, rank=2, world_size=2)
    with pytest.raises(TypeError, match="expected a torchvision.datasets.ImageFolder.*image_folders"):
        _loader([(torch.zeros(3, 4, 4), 0)])
    with pytest.raises(ValueError, match="without transform"):
        _loader(ImageFolder(str(Path(train.root)), transform=T.ToTensor()))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 9\)"):
        _loader(val, indices=[0, 9])
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        _loader(train, num_workers=-1)
    with pytest.raises(ValueError, match="leave none for rank 2 of 3"):
        fixed_batch(val, 2, rank=2, world_size=3, image_size=SIZE)


# --------------------------------------------------------------------------------------------------
# the recipe and its analysis


def _recipe():
    path = Path(__file__).resolve().parents[1] / "recipes" / "image_classification" / "train.py"
    spec = importlib.util.spec_from_file_location("image_classification_train_stream", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through it
    spec.loader.exec_module(module)
    return module


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _drop_time(records):
    return [{k: v for k, v in r.items() if "time" not in k} for r in records]


@pytest.fixture(scope="module")
def recipe_runs(tree, tmp_path_factory):
    """3 epochs straight (2 workers) and 2 + 1 with --resume (no workers) of the streamed recipe."""
    train = _recipe()
    out = tmp_path_factory.mktemp("runs")

    def run(name, epochs, *extra):
        argv = ["--dataset", "imagefolder", "--stream", "--data-dir", str(tree), "--image-size", str(SIZE),
                "--model", "digits_cnn", "--opt", "adahessian", "--batch-size", "8", "--eval-batch-size", "4",
                "--epochs", str(epochs), "--milestones", "2", "--curvature-every", "2", "--curvature-k", "2",
                "--curvature-trace-matvecs", "4", "--curvature-batch-size", "6", "--output-dir", str(out / name),
                "--device", "cpu", "--no-progress", "--no-plots", "--no-tensorboard", *extra]
        return train.main(train.parse_args(argv))

    run("straight", 3, "--workers", "2")
    run("split", 2, "--workers", "0")
    result = run("split", 3, "--workers", "0", "--resume")
    return train, out, result


def test_the_streamed_recipe_resumes_bit_identically(recipe_runs, tree):
    train, out, result = recipe_runs
    assert result["epoch"] == 3
    a = torch.load(out / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(out / "split" / "checkpoint.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["loader"] == b["loader"] == {"seed": 0, "epoch": 3} and a["step"] == b["step"] == 9
    assert b["model_args"]["num_classes"] == 3 and b["model_args"]["in_chans"] == 3
    assert b["dataset_args"]["stream"] is True and b["dataset_args"]["image_size"] == SIZE
    assert b["dataset_args"]["data_dir"] == str(tree) and b["dataset_args"]["mean"] == list(IMAGENET_MEAN)
    metrics = _jsonl(out / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [1, 2, 3]
    assert _drop_time(metrics) == _drop_time(_jsonl(out / "straight" / "metrics.jsonl"))
    curvature = _jsonl(out / "split" / "curvature.jsonl")
    assert [r["step"] for r in curvature] == [0, 2, 4, 6, 8]
    assert all(len(r["top_eigenvalues"]) == 2 and "trace" in r for r in curvature)
    assert _drop_time(curvature) == _drop_time(_jsonl(out / "straight" / "curvature.jsonl"))


def test_recipe_stream_errors(recipe_runs, tree):
    train, out, _ = recipe_runs
    with pytest.raises(ValueError, match="--stream .* needs --dataset imagefolder, not digits"):
        train.resolve(train.Config(dataset="digits", stream=True))
    with pytest.raises(ValueError, match="--stream needs --data-dir"):
        train.resolve(train.Config(dataset="imagefolder", stream=True))
    with pytest.raises(ValueError, match="different image_size"):
        train.main(train.parse_args(["--output-dir", str(out / "split"), "--resume", "--epochs", "4",
                                     "--image-size", "20", "--no-progress"]))


def test_analyze_reads_a_streamed_checkpoint_through_the_eval_transform(recipe_runs, tree, tmp_path, capsys):
    _, out, _ = recipe_runs
    report_dir = tmp_path / "report"
    rc = cli_main([str(out / "split" / "checkpoint.pt"), "--out", str(report_dir), "--device", "cpu",
                   "--batch-size", "4", "--num-batches", "2", "--top-k", "1", "--trace-matvecs", "4",
                   "--density-steps", "4", "--no-plots", "--no-progress"])
    assert rc == 0  # the in-memory loader would refuse these mixed-size images
    report = json.loads((report_dir / "report.json").read_text())
    meta = report["metadata"]
    assert meta["dataset"] == "imagefolder" and meta["num_samples"] == 8 and meta["epoch"] == 3
    # the same loss by hand: the analysis subset of val/, torchvision's eval transform, BN in eval mode
    ckpt = torch.load(out / "split" / "checkpoint.pt", weights_only=False)
    model = build_model("digits_cnn", 3, in_chans=3)
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = ImageFolder(str(tree / "val"))
    reference = T.Compose([T.Resize(18), T.CenterCrop(SIZE), *_normalize()])
    idx = analysis_subset(len(val), 8, seed=0).tolist()
    x = torch.stack([reference(_rgb(val.samples[i][0])) for i in idx])
    y = torch.tensor([val.targets[i] for i in idx])
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
    assert report["summary"]["loss"] == pytest.approx(loss, rel=1e-5)
    capsys.readouterr()
    assert cli_main([str(out / "split"), "--dataset", "digits", "--stream", "--out",
                     str(tmp_path / "bad"), "--no-plots", "--no-progress", "--device", "cpu"]) == 2
    assert "--stream reads ImageFolder trees: it needs --dataset imagefolder" in capsys.readouterr().err
