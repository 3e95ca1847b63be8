"""Measurement machinery shared by the suites: clocks, memory, interleaved repeats, records, logging.

How a time is taken (:func:`interleaved`):

* every contender (an optimizer with its own model copy, or an HVP method) is built and warmed up
  first (``warmup`` measurement windows, untimed: allocator, cuDNN/cuBLAS handles, lazy state);
* then ``repeats`` rounds; in each round every contender is measured once, round-robin, starting
  from a different contender each round (so no contender always runs right after the same one);
* one measurement is a window of ``window`` calls (steps); the device is synchronized
  (``torch.cuda.synchronize``) before the clock starts and before it stops, so the time covers all
  the GPU work the window launched; the window's time divided by ``window`` is one sample;
* the reported time is the median of the samples (the spread is reported too).

How memory is taken (CUDA only; on CPU ``peak_mem_gib`` is ``null``): peak statistics are reset
(``torch.cuda.reset_peak_memory_stats``) right before each measurement, so every measurement starts
fresh. All contenders live on the GPU at once (interleaving needs that), so the raw peak includes
the other contenders' models. The reported peak is what the contender would use alone:

    ``peak = shared + resident + (max_memory_allocated during the window - memory_allocated at its start)``

with ``resident`` the memory the contender itself holds between measurements (its model copy,
gradients, optimizer state, a cached graph: ``memory_allocated`` after its warm-up minus before its
construction) and ``shared`` what all contenders of a workload share (the input batch, a shared
model). ``peak_mem_raw_gib`` (the plain ``max_memory_allocated``) is recorded beside it.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "Contender", "interleaved", "Clock", "log", "environment", "base_record", "REQUIRED_KEYS",
    "format_error", "free_memory", "GIB",
]

GIB = float(2**30)

#: keys every record carries (``optimizer`` for the optimizer suite, ``method`` for the others)
REQUIRED_KEYS = ("suite", "workload", "step_ms", "peak_mem_gib", "ratio_to_adamw", "device", "torch", "date",
                 "command", "error")

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with wall-clock time and seconds since start (flushed: visible in a remote log)."""
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def format_error(err: BaseException) -> str:
    """``Type: message`` on one line, cut to a readable length (the full traceback goes to the log)."""
    text = " ".join(str(err).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(err).__name__}: {text}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Clock:
    """Synchronized wall clock and memory counters for one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds that ``fn()`` and all the device work it launched take."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


class Contender:
    """Something to time: ``setup()`` returns a callable that runs one window of work.

    Args:
        name: the record's ``optimizer``/``method``.
        setup: builds the contender (model copy, optimizer, cached graph ...) and returns
            ``run()``, which performs ``window`` steps.
        window: steps per measurement (the sample is the window's time / ``window``).
        info: extra fields for the record (how the contender is driven, its hyper-parameters).
    """

    def __init__(self, name: str, setup: Callable[[], Callable[[], Any]], window: int = 1, info=None):
        self.name, self.setup, self.window = name, setup, int(window)
        self.info: Dict[str, Any] = dict(info or {})


def interleaved(
    contenders: Sequence[Contender],
    clock: Clock,
    repeats: int,
    warmup: int,
    shared_bytes: int = 0,
    label: str = "",
) -> Dict[str, Dict[str, Any]]:
    """Build, warm up and time ``contenders`` round-robin (see the module docstring).

    Returns, per contender name: ``samples_ms``, ``step_ms`` (median), ``step_ms_min``/``_max``,
    ``peak_mem_gib`` (alone-equivalent, see above; ``None`` on CPU), ``peak_mem_raw_gib``,
    ``resident_gib`` and ``error`` (``None``, or the message of the exception that stopped it; a
    contender that fails is measured no further, the others go on).
    """
    runs: Dict[str, Callable[[], Any]] = {}
    out: Dict[str, Dict[str, Any]] = {}
    resident: Dict[str, int] = {}
    for c in contenders:
        out[c.name] = dict(samples_ms=[], step_ms=None, step_ms_min=None, step_ms_max=None, peak_mem_gib=None,
                           peak_mem_raw_gib=None, resident_gib=None, window=c.window, last_loss=None, error=None)
        gc.collect()  # leftovers of the previous contender must not be freed inside this one's accounting
        before = clock.allocated()
        try:
            t_setup = time.perf_counter()
            run = c.setup()
            for _ in range(warmup):
                run()
            clock.sync()
            log(f"{label}{c.name}: built and warmed up ({warmup} x {c.window} steps) in "
                f"{time.perf_counter() - t_setup:.1f}s")
        except Exception as err:  # a crashing peer is a result, not a reason to stop
            _record_failure(out[c.name], err, f"{label}{c.name} (setup/warm-up)")
            free_memory(clock.device)
            continue
        runs[c.name] = run
        if clock.cuda:
            gc.collect()
            resident[c.name] = clock.allocated() - before
            out[c.name]["resident_gib"] = resident[c.name] / GIB
    peaks: Dict[str, List[float]] = {n: [] for n in runs}
    raw_peaks: Dict[str, List[float]] = {n: [] for n in runs}
    names = [c.name for c in contenders if c.name in runs]
    windows = {c.name: c.window for c in contenders}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            if name not in runs:
                continue
            clock.sync()
            clock.reset_peak()
            start_alloc = clock.allocated()
            try:
                seconds = clock.timed(runs[name])
            except Exception as err:
                _record_failure(out[name], err, f"{label}{name} (repeat {r + 1})")
                del runs[name]
                free_memory(clock.device)
                continue
            out[name]["samples_ms"].append(1000.0 * seconds / windows[name])
            if clock.cuda:
                transient = clock.peak() - start_alloc
                peaks[name].append((shared_bytes + resident[name] + transient) / GIB)
                raw_peaks[name].append(clock.peak() / GIB)
        if names:
            done = ", ".join(
                f"{n} {statistics.median(out[n]['samples_ms']):.2f}" for n in names if out[n]["samples_ms"]
            )
            log(f"{label}repeat {r + 1}/{repeats} (median ms so far): {done}")
    for name in names:
        s = out[name]["samples_ms"]
        if s:
            out[name].update(step_ms=statistics.median(s), step_ms_min=min(s), step_ms_max=max(s))
        if peaks.get(name):
            out[name].update(peak_mem_gib=max(peaks[name]), peak_mem_raw_gib=max(raw_peaks[name]))
        last = getattr(runs.get(name), "last_loss", None)
        if isinstance(last, torch.Tensor):
            out[name]["last_loss"] = float(last)  # sanity: a diverged (NaN) run would time other code paths
    runs.clear()
    free_memory(clock.device)
    return out


def _record_failure(entry: Dict[str, Any], err: BaseException, where: str) -> None:
    entry["error"] = format_error(err)
    log(f"{where} FAILED: {entry['error']}")
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-4:])
    print(tb, file=sys.stderr, flush=True)


def environment(device: torch.device) -> Dict[str, Any]:
    """Fields every record carries: device name, torch version, date, the command line."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    argv = [os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks/run.py"] + sys.argv[1:]
    return {
        "device": name,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python"] + argv),
        "host": {
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        },
    }


def base_record(env: Dict[str, Any], suite: str, workload: str, key: str, name: str) -> Dict[str, Any]:
    """A record with every required key (values filled in by the suite; ``None`` = not applicable)."""
    rec: Dict[str, Any] = {"suite": suite, "workload": workload, key: name}
    rec.update(step_ms=None, peak_mem_gib=None, ratio_to_adamw=None, error=None)
    rec.update({k: env[k] for k in ("device", "torch", "date", "command")})
    return rec


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def timing_fields(res: Dict[str, Any], clock: "Clock", warmup: int) -> Dict[str, Any]:
    """The record fields of one contender's :func:`interleaved` result: times, memory, error."""
    return dict(
        step_ms=res["step_ms"],
        step_ms_min=res["step_ms_min"],
        step_ms_max=res["step_ms_max"],
        samples_ms=res["samples_ms"],
        repeats=len(res["samples_ms"]),
        warmup_windows=warmup,
        peak_mem_gib=res["peak_mem_gib"],
        peak_mem_raw_gib=res["peak_mem_raw_gib"],
        resident_gib=res["resident_gib"],
        peak_mem_note=None if clock.cuda else "not measured on CPU",
        error=res["error"],
    )
