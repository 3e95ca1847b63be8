r"""Diagnostics suite: accuracy and cost of hessopt's eigenvalue, trace and density estimators on a real network.

Set-up (default, GPU): a CIFAR ResNet20 (recipes.common) trained inside the suite on the CIFAR-10 JPEGs
(10 epochs, SGD with Nesterov momentum, batch 256, augmentation on the device via
:class:`recipes.common.DeviceLoader`), unless ``--checkpoint`` names a saved state dict. The Hessian is
that of the mean cross-entropy over a fixed batch of 1024 test images (a seeded random subset),
BatchNorm in eval mode (``HessianOperator(bn_mode="eval")``), float32.
``--quick``: the 8x8 digits (scikit-learn), a tiny CNN (438 parameters), 256 test digits.
``--diag-workload gpt``: the character-level GPT of :mod:`benchmarks.gpt` on Multi30k English, trained
with AdamW; the Hessian of the mean next-token cross-entropy on the first ``--diag-batch`` windows of
val.en, the model wrapped (:class:`FlatLM`) to return ``(B*T, V)`` logits so that every tool gets the
plain ``nn.CrossEntropyLoss()``. ``--side-by-side-only``: of hessopt's own methods only those the
side by side with hessian-eigenthings and curvlinops compares (:mod:`benchmarks.peers_diagnostics`).

Reference: a float64 copy of the model (same weights, same batch in float64).

* full run: eigenvalues from a long Lanczos run (``--ref-steps``, default 150) with full
  reorthogonalization; each Ritz value comes with its residual ``beta_m |s_m|``, a certificate of
  its accuracy. Trace from Hutch++ with ``--ref-trace-matvecs`` products (default 300) and its
  standard error.
* ``--quick``: the exact dense Hessian (one float64 HVP per unit vector), its eigenvalues by
  ``eigh`` and its exact trace.

Measured, each on a fresh float32 operator whose products are timed (CUDA-synchronized):

* top-1 (tol 1e-3) and top-5 (tol 1e-4) eigenvalues, Lanczos vs power iteration with deflation:
  matvecs, seconds, true relative error against the reference, residuals ``||Hv - lambda v||``;
* trace, Hutchinson vs Hutch++ at equal budgets (``--trace-budgets``, default 30, 99, 300 matvecs):
  estimate, standard error, true relative error, and the error in units of the combined standard
  error (``z``: an honest error bar gives ``|z| < 2`` most of the time);
* SLQ spectral density (``--slq-steps``, default 100 Lanczos steps): total seconds split into HVP
  seconds and everything else (the operator is wrapped to time its matvecs);
* the cost of one HVP (fresh graph / cached graph) relative to one gradient on the same batch.

The markdown report puts these beside the PyHessian and hessian-eigenthings figures that the hessopt
authors measured with those tools' own code on an H100, on the same kind of model and batch.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.operators import CurvatureOperator

from .harness import GIB, Clock, base_record, format_error, free_memory, log

SUITE = "diagnostics"


class TinyDigitsNet(nn.Module):
    """438 parameters: conv 3x3 (4) + BN -> conv 3x3 stride 2 (8) + BN -> global pool -> linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TimedOperator(CurvatureOperator):
    """Wraps an operator and accumulates the (synchronized) time and number of its matvecs."""

    def __init__(self, op: CurvatureOperator, clock: Clock):
        self.op, self.clock = op, clock
        self.num_params, self.dtype, self.device, self.shapes = op.num_params, op.dtype, op.device, op.shapes
        self.hvp_seconds, self.matvecs = 0.0, 0

    def broadcast_seed(self, seed: int) -> int:
        return self.op.broadcast_seed(seed)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.clock.sync()
        t0 = time.perf_counter()
        out = self.op @ v
        self.clock.sync()
        self.hvp_seconds += time.perf_counter() - t0
        self.matvecs += 1
        return out


# --------------------------------------------------------------------------------------------------
# model and data


def _setting(args) -> Dict[str, Any]:
    epochs, batch = args.diag_epochs, args.diag_batch
    if getattr(args, "diag_workload", "resnet20") == "gpt":
        return _gpt_setting(args)
    if args.quick:
        batch = 256 if batch is None else batch
        return dict(workload=f"digits_tinycnn_{batch}_quick", dataset="digits", model="tiny_digits_cnn", batch=batch,
                    epochs=30 if epochs is None else epochs, train_batch=64, lr=0.05)
    batch = 1024 if batch is None else batch
    return dict(workload=f"cifar10_resnet20_{batch}", dataset="cifar10", model="cifar_resnet20", batch=batch,
                epochs=10 if epochs is None else epochs, train_batch=256, lr=0.1)


def _gpt_setting(args) -> Dict[str, Any]:
    """The character-level GPT (benchmarks/gpt.py) on Multi30k English; ``batch`` = validation sequences."""
    q = args.quick
    size = dict(d_model=args.gpt_d_model or (4 if q else 64), n_layers=args.gpt_layers or (1 if q else 2),
                n_heads=args.gpt_heads or (2 if q else 4), seq_len=args.gpt_context or (8 if q else 64))
    batch = args.diag_batch or (4 if q else 16)
    steps = args.gpt_train_steps if args.gpt_train_steps is not None else (20 if q else 300)
    tag = f"d{size['d_model']}_l{size['n_layers']}_t{size['seq_len']}"
    return dict(workload=f"multi30k_gpt_{tag}_{batch}" + ("_quick" if q else ""), dataset="multi30k_char",
                model="gpt", batch=batch, steps=steps, train_batch=16 if not q else 4, lr=3e-3, **size,
                max_chars=100_000 if q else None)


class FlatLM(nn.Module):
    """The GPT with its logits reshaped to ``(B*T, V)``: the loss of every tool is then the plain
    ``nn.CrossEntropyLoss()`` against the ``(B*T,)`` targets (the mean next-token cross-entropy)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.lm(tokens)
        return logits.reshape(-1, logits.shape[-1])


def _build(setting, data) -> nn.Module:
    if setting["model"] == "tiny_digits_cnn":
        return TinyDigitsNet(data.num_classes)
    if setting["model"] == "gpt":
        from .gpt import GPT

        return FlatLM(GPT(data.vocab_size, setting["d_model"], setting["n_layers"], setting["n_heads"],
                          setting["seq_len"]))
    from recipes.common import build_model

    return build_model(setting["model"], data.num_classes, in_chans=data.in_chans)


def _load_data(setting, args):
    if setting["model"] == "gpt":
        return _load_text(setting, args)
    from recipes.common import load_dataset

    log(f"[diagnostics] loading {setting['dataset']}")
    t0 = time.perf_counter()
    data = load_dataset(setting["dataset"], data_dir=args.data_dir) if setting["dataset"] == "cifar10" \
        else load_dataset("digits")
    log(f"[diagnostics] {data} loaded in {time.perf_counter() - t0:.1f}s")
    return data


def _load_text(setting, args):
    """Multi30k English characters, as the quality suite's GPT workload (benchmarks/quality_workloads.py)."""
    from types import SimpleNamespace

    from .quality_workloads import _read_lines, default_data_root

    root = args.quality_data_dir or str(default_data_root())
    folder = os.path.join(os.path.expanduser(root), "multi30k")
    from pathlib import Path

    train_text = _read_lines(Path(folder) / "train.en.gz", max_chars=setting.get("max_chars"))
    val_text = _read_lines(Path(folder) / "val.en.gz")
    stoi = {c: i + 1 for i, c in enumerate(sorted(set(train_text)))}  # 0: characters unseen in training
    train = torch.tensor([stoi[c] for c in train_text], dtype=torch.int64)
    val = torch.tensor([stoi.get(c, 0) for c in val_text], dtype=torch.int64)
    log(f"[diagnostics] multi30k characters: {train.numel()} train, {val.numel()} val, vocabulary {len(stoi) + 1}")
    return SimpleNamespace(train=train, val=val, vocab_size=len(stoi) + 1, folder=folder)


def _load_checkpoint(model: nn.Module, ckpt: str, device) -> Dict[str, Any]:
    """Load the trained weights written by an earlier run; returns the record's training fields."""
    state = torch.load(ckpt, map_location=device)
    model.load_state_dict(state["model"] if "model" in state else state)
    log(f"[diagnostics] loaded checkpoint {ckpt}")
    return {"checkpoint": ckpt, "epochs": state.get("epochs") if isinstance(state, dict) else None}


def _train(model: nn.Module, data, setting, device, seed: int) -> Dict[str, Any]:
    if setting["model"] == "gpt":
        return _train_gpt(model, data, setting, device, seed)
    return _train_image(model, data, setting, device, seed)


def _train_gpt(model: nn.Module, data, setting, device, seed: int) -> Dict[str, Any]:
    """AdamW (lr 3e-3, betas 0.9/0.95, wd 0.1 on the matrices), linear warm-up then cosine, random windows."""
    T, B, steps = setting["seq_len"], setting["train_batch"], setting["steps"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=setting["lr"], betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(10_000 + seed)
    ar = torch.arange(T + 1)
    train = data.train
    clock = Clock(device)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        start = torch.randint(0, train.numel() - T - 1, (B,), generator=gen)
        tok = train[start[:, None] + ar].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tok[:, :-1]), tok[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == steps - 1 or (step + 1) % max(1, steps // 5) == 0:
            clock.sync()
            log(f"[diagnostics] train step {step + 1}/{steps}: loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.1f}s)")
    clock.sync()
    return {"epochs": None, "steps": steps, "train_seconds": time.perf_counter() - t0,
            "train_optimizer": f"AdamW lr {setting['lr']} betas (0.9, 0.95) wd 0.1 (matrices), batch {B} random windows "
                               f"of {T} characters, warm-up + cosine, gradient norm clipped to 1.0",
            "augmentation": "none"}


def _train_image(model: nn.Module, data, setting, device, seed: int) -> Dict[str, Any]:
    """SGD (Nesterov, momentum 0.9, wd 5e-4), one epoch of linear warm-up then cosine decay."""
    from recipes.common import DeviceLoader

    cifar = setting["dataset"] == "cifar10"
    loader = DeviceLoader(data.train_x, data.train_y, setting["train_batch"], data.mean, data.std, shuffle=True,
                          augment=cifar, flip=cifar, device=device, seed=seed)
    epochs = setting["epochs"]
    opt = torch.optim.SGD(model.parameters(), lr=setting["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = max(1, epochs * len(loader))
    warm = min(len(loader), total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    clock = Clock(device)
    clock.sync()
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        if epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 5) == 0:
            clock.sync()
            log(f"[diagnostics] train epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.1f}s)")
    clock.sync()
    return {"epochs": epochs, "train_seconds": time.perf_counter() - t0, "train_optimizer": "SGD nesterov lr "
            f"{setting['lr']} momentum 0.9 wd 5e-4, batch {setting['train_batch']}, warm-up + cosine",
            "augmentation": "random crop (pad 4) + flip" if cifar else "none"}


@torch.no_grad()
def _accuracy(model: nn.Module, data, device) -> float:
    from recipes.common import DeviceLoader

    model.eval()
    loader = DeviceLoader(data.test_x, data.test_y, 1000, data.mean, data.std, device=device)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(data.test_y)


@torch.no_grad()
def _quality(model: nn.Module, data, setting, device) -> Dict[str, Any]:
    """Test accuracy (images), or the validation cross-entropy on up to 256 windows (GPT)."""
    if setting["model"] != "gpt":
        return {"test_accuracy": _accuracy(model, data, device)}
    model.eval()
    x, y = _gpt_windows(data, setting, device, 256)
    total = sum(float(F.cross_entropy(model(x[i:i + 32]), y[i * setting["seq_len"]:(i + 32) * setting["seq_len"]],
                                      reduction="sum")) for i in range(0, x.shape[0], 32))
    return {"test_accuracy": None, "val_loss": total / y.numel()}


def _gpt_windows(data, setting, device, n: int):
    """The first ``n`` non-overlapping windows of val.en: tokens (n, T), next-token targets (n*T,)."""
    T = setting["seq_len"]
    n = min(n, (data.val.numel() - 1) // T)
    tok = data.val[(torch.arange(n) * T)[:, None] + torch.arange(T + 1)]
    return tok[:, :-1].contiguous().to(device), tok[:, 1:].reshape(-1).to(device)


def _fixed_batch(data, n: int, device, seed: int, setting=None) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    if setting is not None and setting["model"] == "gpt":
        x, y = _gpt_windows(data, setting, device, n)
        return x, y, list(range(x.shape[0]))
    idx = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(seed))[:n]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.test_x[idx].float() / 255.0 - mean) / std
    return x.to(device), data.test_y[idx].to(device), idx.tolist()


def _to64(x: torch.Tensor) -> torch.Tensor:
    """Float inputs in float64; token ids stay integers."""
    return x.double() if x.is_floating_point() else x


def _load() -> List[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------------
# reference


def _ritz(alphas: torch.Tensor, betas: torch.Tensor, beta_last: float):
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)
    return theta[order], (beta_last * S[-1, order]).abs()


def _reference(model, x, y, args, setting, clock) -> Dict[str, Any]:
    model64 = copy.deepcopy(model).double()
    op64 = hessopt.HessianOperator(model64, nn.CrossEntropyLoss(), (_to64(x), y), bn_mode="eval")
    ref: Dict[str, Any] = {}
    clock.sync()
    t0 = time.perf_counter()
    if args.quick:
        H = op64.to_dense()  # one float64 product per unit vector: the exact Hessian of a tiny model
        H = 0.5 * (H + H.T)
        evals = torch.linalg.eigvalsh(H.cpu()).flip(0)
        ref.update(kind="exact dense Hessian (float64), eigvalsh and diagonal sum",
                   eigenvalues=evals[:5].tolist(), residuals=[0.0] * 5, smallest=float(evals[-1]),
                   trace=float(torch.diagonal(H).sum()), trace_std_error=0.0, eig_matvecs=op64.num_params,
                   trace_matvecs=None)
        clock.sync()
        ref["seconds"] = time.perf_counter() - t0
        return ref
    steps = min(args.ref_steps, op64.num_params)
    lz = hessopt.lanczos(op64, num_steps=steps, generator=args.seed + 101, keep_basis=False)
    theta, res = _ritz(lz.alphas, lz.betas, lz.residual_norm)
    clock.sync()
    t_eig = time.perf_counter() - t0
    log(f"[diagnostics] reference Lanczos ({steps} steps, float64): top-5 {[round(float(t), 3) for t in theta[:5]]}, "
        f"residuals {[f'{float(r):.1e}' for r in res[:5]]} ({t_eig:.1f}s)")
    t1 = time.perf_counter()
    tr = hessopt.trace(op64, num_matvecs=args.ref_trace_matvecs, method="hutch++", generator=args.seed + 202)
    clock.sync()
    t_tr = time.perf_counter() - t1
    log(f"[diagnostics] reference trace (Hutch++ {args.ref_trace_matvecs} matvecs, float64): "
        f"{tr.estimate:.2f} +- {tr.std_error:.2f} ({t_tr:.1f}s)")
    ref.update(kind=f"float64 Lanczos, {steps} steps, full reorthogonalization; trace: float64 Hutch++ "
                    f"{args.ref_trace_matvecs} matvecs (with its standard error)",
               eigenvalues=theta[:5].tolist(), residuals=res[:5].tolist(), smallest=float(theta[-1]),
               smallest_residual=float(res[-1]), trace=tr.estimate, trace_std_error=tr.std_error,
               eig_matvecs=lz.num_matvecs, trace_matvecs=tr.num_matvecs, eig_seconds=t_eig, trace_seconds=t_tr,
               seconds=t_eig + t_tr)
    del op64, model64
    return ref


# --------------------------------------------------------------------------------------------------
# the measured methods


def _timed_call(fn, op: TimedOperator, clock: Clock):
    clock.reset_peak()
    clock.sync()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(op)
    clock.sync()
    seconds = time.perf_counter() - t0
    notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    peak = clock.peak()
    return result, seconds, notes, (None if peak is None else peak / GIB)


def run_suite(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Append this suite's records to ``records`` (``flush()`` after each batch of them: partial results survive)."""
    device = torch.device(args.device)
    clock = Clock(device)
    setting = _setting(args)
    wl = setting["workload"]

    # load average (1, 5, 15 min) when the previous record was written (= when this measurement began:
    # the measurements run back to back) and when this one was written
    load = {"last": _load()}

    def record(method: str, **fields) -> Dict[str, Any]:
        rec = base_record(env, SUITE, wl, "method", method)
        rec["peak_mem_note"] = None if clock.cuda else "not measured on CPU"
        rec["torch_threads"] = torch.get_num_threads()
        now = _load()
        rec.update(load_avg_start=load["last"], load_avg_end=now)
        load["last"] = now
        rec.update(fields)
        records.append(rec)
        flush()
        return rec

    data = _load_data(setting, args)
    torch.manual_seed(args.seed)
    model = _build(setting, data).to(device)
    ckpt = args.checkpoint
    train_info: Dict[str, Any]
    if ckpt and os.path.exists(ckpt):
        train_info = _load_checkpoint(model, ckpt, device)
    else:
        train_info = _train(model, data, setting, device, args.seed)
        path = ckpt or (os.path.join(args.out, "diagnostics_model.pt") if args.save_checkpoint else None)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.save({"model": model.state_dict(), "epochs": train_info["epochs"], "setting": setting}, path)
            train_info["saved_to"] = path
    quality = _quality(model, data, setting, device)
    log(f"[diagnostics] model: {setting['model']}, " + ", ".join(f"{k} {v:.4f}" for k, v in quality.items() if v is not None))
    model.eval()
    x, y, idx = _fixed_batch(data, setting["batch"], device, args.seed, setting)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common = dict(model=setting["model"], dataset=setting["dataset"], batch=setting["batch"], bn_mode="eval",
                  dtype="float32", num_params=num_params)
    gpt_info = {k: setting[k] for k in ("d_model", "n_layers", "n_heads", "seq_len") if k in setting}
    if gpt_info:
        gpt_info.update(vocab_size=data.vocab_size, tokens=int(y.numel()),
                        hessian_of="mean next-token cross-entropy, logits reshaped (B*T, V) vs targets (B*T), "
                                   f"the first {x.shape[0]} non-overlapping windows of val.en",
                        attention="F.scaled_dot_product_attention(is_causal=True), PyTorch's default kernels")
    record("model", **quality, batch_indices_seed=args.seed, cpu_model=_cpu_model(), cpu_count=os.cpu_count(),
           side_by_side_only=bool(getattr(args, "side_by_side_only", False)), **gpt_info, **train_info, **common)

    loss_fn = nn.CrossEntropyLoss()

    def fresh_op() -> TimedOperator:
        return TimedOperator(hessopt.HessianOperator(model, loss_fn, (x, y), bn_mode="eval"), clock)

    # The float32 measurements come first and the (slow, float64) reference last: a run stopped by a
    # time limit keeps its timings, and the errors are filled in once the reference exists.

    # -- cost of one HVP relative to one gradient on this batch -------------------------------------
    _hvp_cost(model, loss_fn, x, y, clock, args, record, common)

    # -- eigenvalues --------------------------------------------------------------------------------
    # "lanczos_nocheck": Lanczos without the check chain for repeated eigenvalues (check_multiplicity=False)
    eig_cases = [("lanczos", 1, 1e-3, None), ("lanczos_nocheck", 1, 1e-3, None), ("power", 1, 1e-3, args.power_max_matvecs),
                 ("lanczos", 5, 1e-4, None), ("lanczos_nocheck", 5, 1e-4, None),
                 ("power", 5, 1e-4, args.power_max_matvecs * 5 // 2)]
    side_only = bool(getattr(args, "side_by_side_only", False))
    if side_only:  # --side-by-side-only: hessopt's top-5 is measured beside the peers (side_hessopt_*_top5)
        eig_cases = []
    for variant, k, tol, cap in eig_cases:
        name = f"{variant}_top{k}"
        method = variant.split("_")[0]
        options = {"check_multiplicity": False} if variant == "lanczos_nocheck" else {}
        op = fresh_op()
        try:
            res, seconds, notes, peak = _timed_call(
                lambda o: hessopt.top_eigenvalues(o, k=k, method=method, tol=tol, max_matvecs=cap,
                                                  generator=args.seed + 7, **options), op, clock)
        except Exception as err:
            log(f"[diagnostics] {name} FAILED: {format_error(err)}")
            record(name, k=k, tol=tol, error=format_error(err), **common)
            continue
        vals = [float(v) for v in res.eigenvalues]  # NaN where the budget ran out before this one
        rel_res = [float(r) / abs(v) if v and math.isfinite(v) and math.isfinite(float(r)) else None
                   for r, v in zip(res.residuals, vals)]
        record(name, k=k, tol=tol, max_matvecs=cap, matvecs=res.num_matvecs, seconds=seconds,
               step_ms=1000 * seconds, hvp_seconds=op.hvp_seconds, other_seconds=seconds - op.hvp_seconds,
               eigenvalues=vals, found=sum(math.isfinite(v) for v in vals),
               residuals=[float(r) for r in res.residuals], rel_residuals=rel_res,
               error_bounds=[float(b) for b in res.error_bounds], converged=bool(res.converged), warnings=notes,
               peak_mem_gib=peak, **common)
        log(f"[diagnostics] {name} tol {tol}: {res.num_matvecs} matvecs, {seconds:.2f}s, eigenvalues "
            f"{[round(v, 3) for v in vals]}, residual/lambda {_fmt_list(rel_res)}, converged {bool(res.converged)}")

    # -- trace ----------------------------------------------------------------------------------------
    for m in args.trace_budgets:
        for method in (("hutch++",) if side_only else ("hutchinson", "hutch++")):
            name = f"{method.replace('++', 'pp')}_trace_m{m}"
            op = fresh_op()
            try:
                res, seconds, notes, peak = _timed_call(
                    lambda o: hessopt.trace(o, num_matvecs=m, method=method, generator=args.seed + 11 + m), op, clock)
            except Exception as err:
                log(f"[diagnostics] {name} FAILED: {format_error(err)}")
                record(name, budget=m, error=format_error(err), **common)
                continue
            record(name, budget=m, matvecs=res.num_matvecs, seconds=seconds, step_ms=1000 * seconds,
                   hvp_seconds=op.hvp_seconds, other_seconds=seconds - op.hvp_seconds, estimate=res.estimate,
                   std_error=res.std_error, peak_mem_gib=peak, **common)
            log(f"[diagnostics] {name}: {res.estimate:.2f} +- {res.std_error:.2f}, {seconds:.2f}s")

    # -- spectral density -----------------------------------------------------------------------------
    op = fresh_op()
    name = f"slq_{args.slq_steps}"
    try:
        res, seconds, notes, peak = _timed_call(
            lambda o: hessopt.spectral_density(o, num_runs=1, num_steps=args.slq_steps, generator=args.seed + 13),
            op, clock)
        top = float(max(float(t.max()) for t in res.nodes))
        record(name, steps=args.slq_steps, runs=1, matvecs=res.num_matvecs, seconds=seconds,
               step_ms=1000 * seconds, hvp_seconds=op.hvp_seconds, other_seconds=seconds - op.hvp_seconds,
               other_fraction=(seconds - op.hvp_seconds) / seconds if seconds > 0 else None,
               top_node=top, trace_from_esd=res.mean * num_params, peak_mem_gib=peak, **common)
        log(f"[diagnostics] {name}: {seconds:.2f}s total, {op.hvp_seconds:.2f}s in HVPs, "
            f"{seconds - op.hvp_seconds:.2f}s else; top node {top:.3f}")
    except Exception as err:
        log(f"[diagnostics] {name} FAILED: {format_error(err)}")
        record(name, steps=args.slq_steps, error=format_error(err), **common)
    del op

    # -- side by side: hessopt's GGN, hessian-eigenthings 1.0, curvlinops 3.x (benchmarks/peers_diagnostics.py)
    from .peers_diagnostics import run_side_by_side

    run_side_by_side(model, loss_fn, x, y, clock, args, record, common)
    if setting["model"] == "gpt":  # the peers again with the math attention kernel, so their numbers exist
        run_side_by_side(model, loss_fn, x, y, clock, args, record, common, attention="math")
    from .peers_diagnostics import per_product

    per_product(model, loss_fn, x, y, clock, args, record, common, repeats=max(3, args.repeats),
                attention_for_peers="math" if setting["model"] == "gpt" else None)

    # -- reference, then the true errors of everything above ------------------------------------------
    free_memory(device)
    try:
        ref = _reference(model, x, y, args, setting, clock)
    except Exception as err:  # without a reference the errors cannot be computed; the timings stand
        log(f"[diagnostics] reference FAILED: {format_error(err)}")
        ref = {"eigenvalues": None, "trace": None, "trace_std_error": None, "error": format_error(err)}
    record("reference", step_ms=None, **{k: v for k, v in ref.items() if k != "error"},
           error=ref.get("error"), **common)
    _score(records, ref)
    _ggn_reference_and_score(model, x, y, args, records, ref, record, common)
    flush()
    _plot(records, args)
    del model, x, y
    free_memory(device)
    return records


def fill_reference(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Compute only the float64 reference for an earlier run's records and score them (in place).

    For a run stopped (time limit, lost machine) after its float32 measurements but before the
    reference finished: ``records`` are that run's, the model comes from ``--checkpoint`` (the run
    wrote it to ``OUT/diagnostics_model.pt``), and the fixed batch is rebuilt from the same seed and
    size the run recorded, so the reference is of the very Hessian that was measured.
    """
    model_recs = [r for r in records if r.get("method") == "model" and r.get("suite") == SUITE]
    if not model_recs:
        raise ValueError("--reference-only: OUT/diagnostics.json has no 'model' record; run the suite first")
    ckpt = args.checkpoint
    if not ckpt or not os.path.exists(ckpt):
        raise ValueError(f"--reference-only needs --checkpoint pointing at the run's model (got {ckpt!r})")
    m = model_recs[0]
    args.diag_batch = m["batch"]
    setting = _setting(args)
    if setting["model"] != m["model"]:
        raise ValueError(f"--reference-only: the run measured {m['model']}, these arguments build {setting['model']} "
                         "(pass the same --quick setting as the run)")
    device = torch.device(args.device)
    data = _load_data(setting, args)
    torch.manual_seed(args.seed)
    model = _build(setting, data).to(device)
    _load_checkpoint(model, ckpt, device)
    model.eval()
    x, y, _ = _fixed_batch(data, setting["batch"], device, m.get("batch_indices_seed", args.seed), setting)
    ref = _reference(model, x, y, args, setting, Clock(device))
    records[:] = [r for r in records if r.get("method") != "reference"]
    common = {k: m[k] for k in ("model", "dataset", "batch", "bn_mode", "dtype", "num_params") if k in m}
    rec = base_record(env, SUITE, setting["workload"], "method", "reference")
    rec.update(step_ms=None, note="computed afterwards by --reference-only from the run's checkpoint", **ref, **common)
    records.append(rec)
    _score(records, ref)
    records[:] = [r for r in records if r.get("method") != "reference_ggn"]

    def record(method, **fields):
        out = base_record(env, SUITE, setting["workload"], "method", method)
        out.update(fields)
        records.append(out)

    _ggn_reference_and_score(model, x, y, args, records, ref, record, common)
    flush()
    return records


def _plot(records, args) -> None:
    """OUT/side_by_side.png (benchmarks/report.py); a missing matplotlib is logged, not fatal."""
    from .report import side_by_side_plot

    try:
        path = side_by_side_plot(records, os.path.join(args.out, "side_by_side.png"))
        if path:
            log(f"[diagnostics] wrote {path}")
    except Exception as err:  # noqa: BLE001 - the records are what matters
        log(f"[diagnostics] side-by-side plot FAILED: {format_error(err)}")


def products_only(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Add the interleaved steady-state per-product records (peers_diagnostics.per_product) to an
    earlier run's records, on its model (``--checkpoint``) and fixed batch (same seed and size)."""
    from .peers_diagnostics import per_product

    model_recs = [r for r in records if r.get("method") == "model" and r.get("suite") == SUITE]
    if not model_recs:
        raise ValueError("--products-only: OUT/diagnostics.json has no 'model' record; run the suite first")
    if not args.checkpoint or not os.path.exists(args.checkpoint):
        raise ValueError(f"--products-only needs --checkpoint pointing at the run's model (got {args.checkpoint!r})")
    m = model_recs[0]
    args.diag_batch = m["batch"]
    setting = _setting(args)
    if setting["model"] != m["model"]:
        raise ValueError(f"--products-only: the run measured {m['model']}, these arguments build {setting['model']}")
    device = torch.device(args.device)
    data = _load_data(setting, args)
    torch.manual_seed(args.seed)
    model = _build(setting, data).to(device)
    _load_checkpoint(model, args.checkpoint, device)
    model.eval()
    x, y, _ = _fixed_batch(data, setting["batch"], device, m.get("batch_indices_seed", args.seed), setting)
    records[:] = [r for r in records if not r.get("per_product")]
    common = {k: m[k] for k in ("model", "dataset", "batch", "bn_mode", "dtype", "num_params") if k in m}
    load = {"last": _load()}

    def record(method, **fields):
        out = base_record(env, SUITE, setting["workload"], "method", method)
        now = _load()
        out.update(torch_threads=torch.get_num_threads(), load_avg_start=load["last"], load_avg_end=now,
                   note="added afterwards by --products-only from the run's checkpoint")
        load["last"] = now
        out.update(fields)
        records.append(out)
        flush()

    per_product(model, nn.CrossEntropyLoss(), x, y, Clock(device), args, record, common, repeats=max(3, args.repeats),
                attention_for_peers="math" if setting["model"] == "gpt" else None)
    _plot(records, args)
    return records


def _ggn_reference_and_score(model, x, y, args, records, hessian_ref, record, common) -> None:
    """The float64 GGN reference (dense with --quick, else converged Lanczos) and the true errors of
    the side-by-side records (benchmarks/peers_diagnostics.py)."""
    from .peers_diagnostics import ggn_reference, score_side_by_side

    try:
        ggn_ref = ggn_reference(copy.deepcopy(model).double(), _to64(x), y, args.quick)
    except Exception as err:
        log(f"[diagnostics] GGN reference FAILED: {format_error(err)}")
        ggn_ref = {"eigenvalues": None, "error": format_error(err)}
    record("reference_ggn", step_ms=None, **ggn_ref, **common)
    score_side_by_side(records, hessian_ref, ggn_ref)


def _score(records: List[Dict[str, Any]], ref: Dict[str, Any]) -> None:
    """Fill in each measured record's true error against the reference (in place)."""
    ref_eigs, ref_tr = ref.get("eigenvalues"), ref.get("trace")
    ref_se = ref.get("trace_std_error") or 0.0
    for rec in records:
        if rec.get("error") or rec.get("suite") != SUITE:
            continue
        m = rec["method"]
        if m.startswith(("lanczos_top", "lanczos_nocheck_top", "power_top")):
            k = rec["k"]
            rel = None if not ref_eigs else [abs(v - r) / abs(r) if v is not None and math.isfinite(v) else None
                                             for v, r in zip(rec["eigenvalues"], ref_eigs[:k])]
            rec.update(reference=None if not ref_eigs else ref_eigs[:k], rel_errors=rel,
                       max_rel_error=None if rel is None or None in rel else max(rel))
            log(f"[diagnostics] {m}: true relative errors {_fmt_list(rel)}")
        elif "_trace_m" in m:
            est, se = rec["estimate"], rec["std_error"]
            rel = None if ref_tr is None else abs(est - ref_tr) / abs(ref_tr)
            comb = math.sqrt(se ** 2 + ref_se ** 2) if math.isfinite(se) else math.inf
            rec.update(reference=ref_tr, reference_std_error=ref_se, rel_error=rel,
                       rel_std_error=se / abs(ref_tr) if ref_tr else None,
                       z=None if ref_tr is None or not comb > 0 or not math.isfinite(comb) else (est - ref_tr) / comb)
            z = rec["z"]
            log(f"[diagnostics] {m}: relative error {_fmt_list([rel])}, z = {'-' if z is None else f'{z:.2f}'}")
        elif m.startswith("slq_"):
            rec.update(top_node_rel_error=None if not ref_eigs else abs(rec["top_node"] - ref_eigs[0]) / abs(ref_eigs[0]),
                       trace_from_esd_rel_error=None if ref_tr is None else abs(rec["trace_from_esd"] - ref_tr) / abs(ref_tr))


def _fmt_list(values) -> str:
    if values is None:
        return "-"
    return "[" + ", ".join("-" if v is None else f"{v:.1e}" for v in values) + "]"


def _hvp_cost(model, loss_fn, x, y, clock: Clock, args, record, common) -> None:
    """Median time of one gradient, one HVP on a fresh graph and one on the cached graph (same batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(args.seed + 17)
    v = torch.randn(sum(p.numel() for p in params), generator=gen).to(x.device)
    op_fresh = hessopt.HessianOperator(model, loss_fn, (x, y), bn_mode="eval", cache_graph=False)
    op_cached = hessopt.HessianOperator(model, loss_fn, (x, y), bn_mode="eval", cache_graph=True)
    fns = {"gradient": op_fresh.gradient, "hvp_fresh_graph": lambda: op_fresh @ v, "hvp_cached_graph": lambda: op_cached @ v}
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    try:
        for _ in range(max(1, args.warmup)):
            for fn in fns.values():
                fn()
        for r in range(max(3, args.repeats)):
            for name, fn in fns.items():  # interleaved, like the other suites
                samples[name].append(1000 * clock.timed(fn))
    except Exception as err:
        log(f"[diagnostics] HVP cost FAILED: {format_error(err)}")
        record("hvp_cost", error=format_error(err), **common)
        return
    grad_ms = statistics.median(samples["gradient"])
    for name, s in samples.items():
        ms = statistics.median(s)
        record(name, step_ms=ms, samples_ms=s, ratio_to_grad=ms / grad_ms, **common)
    log("[diagnostics] one gradient {:.1f} ms; HVP fresh graph {:.2f}x, cached graph {:.2f}x".format(
        grad_ms, statistics.median(samples["hvp_fresh_graph"]) / grad_ms,
        statistics.median(samples["hvp_cached_graph"]) / grad_ms))
