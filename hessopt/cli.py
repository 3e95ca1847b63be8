"""The ``hessopt`` command line: ``hessopt analyze`` on the user's own model and data.

``hessopt analyze`` imports the user's code by ``module:function`` (the current directory is put
on ``sys.path`` first, as ``python -m`` does) and writes a curvature report with
:func:`hessopt.report` (``OUT/report.json``, ``OUT/report.md``, PNG plots)::

    hessopt analyze --model-fn mypkg.models:build --weights model.pt \\
        --data-fn mypkg.data:held_out --loss cross_entropy --out report/ -k 5 --layerwise

* ``--model-fn MODULE:FUNCTION`` (or ``--model MODULE:FUNCTION``): a callable returning an
  ``nn.Module``. ``--weights PATH`` (or a positional PATH) loads a plain state dict into it (also a
  dict holding one under ``state_dict``, ``model_state_dict`` or ``model``); or the callable loads
  its weights itself. ``--timm NAME`` (or ``--model timm:NAME``) builds a timm model instead.
* ``--data-fn MODULE:FUNCTION``: a callable returning one batch or an iterable of batches (a list,
  a generator, a DataLoader). A batch is an ``(inputs, targets)`` pair (``model(inputs)``; a tuple
  of inputs is unpacked) or a dict (``model(**batch)``, the HuggingFace convention).
* ``--loss``: ``cross_entropy``, ``mse``, ``l1``, ``smooth_l1``, ``huber``, ``nll``, ``bce``,
  ``bce_with_logits`` (of the model's output, or of its ``.logits``; with dict batches the targets
  are ``batch["labels"]``), or ``MODULE:FUNCTION`` called as ``fn(outputs, targets)``
  (``fn(outputs, batch)`` for dict batches), or as ``fn(model, batch)`` with ``--loss-form model``.
  Without ``--loss``, dict batches use the loss the model computes itself (``outputs.loss``).
* ``--model-arg KEY=VALUE`` / ``--data-arg KEY=VALUE`` (repeatable; VALUE is read as JSON when it
  parses, e.g. ``3``, ``true``, ``[1, 2]``, else as a string) and ``--model-args JSON`` /
  ``--data-args JSON`` (an object) are passed to the callables as keyword arguments.

Every user error (a malformed spec, a missing module or attribute, a callable that raises or
returns the wrong type, an unreadable weights file) is printed as ``hessopt analyze: error: ...``
with exit status 2 and no traceback (``--debug`` shows it).

In a clone of the hessopt repository, checkpoints of its image-classification recipe are analyzed
through the recipe's adapter (not part of the package),
``recipes/image_classification/analyze.py`` (or ``--model-fn
recipes.image_classification.checkpoint:build_model --data-fn
recipes.image_classification.checkpoint:batches`` from the repository root).

``python -m hessopt`` and ``python -m hessopt.cli`` do the same as the ``hessopt`` console script.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pickle
import re
import sys
import traceback
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "analyze", "CLIError", "resolve_callable", "LOSSES",
           "positive_int", "nonneg_int", "positive_float"]


class CLIError(Exception):
    """A user-facing error: printed as ``hessopt COMMAND: error: ...`` with exit status 2."""


#: ``--loss`` names -> the ``torch.nn.functional`` function (mean reduction)
LOSSES = {
    "cross_entropy": "cross_entropy",
    "mse": "mse_loss",
    "l1": "l1_loss",
    "smooth_l1": "smooth_l1_loss",
    "huber": "huber_loss",
    "nll": "nll_loss",
    "bce": "binary_cross_entropy",
    "bce_with_logits": "binary_cross_entropy_with_logits",
}
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------

# argparse ``type=`` converters with one-line errors (also used by the recipes' command lines)
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessopt",
        description="hessopt: AdaHessian optimizer and Hessian diagnostics for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser(
        "analyze",
        help="curvature report of your own model and data (eigenvalues, trace, density, ...)",
        description="Curvature report of your own model and data: top eigenvalues, trace (with standard "
        "error), spectral density, and optionally layer-wise spectra and loss landscapes. Writes "
        "OUT/report.json, OUT/report.md and PNG plots (hessopt.report). Model and data come from your code, "
        "imported by MODULE:FUNCTION with the current directory on sys.path.",
        epilog="Example: hessopt analyze --model-fn mypkg.models:build --weights model.pt "
        "--data-fn mypkg.data:held_out --loss cross_entropy --out report/ -k 5. Recipe checkpoints of this "
        "repository: python recipes/image_classification/analyze.py CHECKPOINT --out DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("weights_path", nargs="?", default=None, metavar="WEIGHTS",
                   help="state dict to load into the model (the same as --weights)")
    src = a.add_argument_group("model")
    src.add_argument("--model-fn", default=None, metavar="MODULE:FUNCTION",
                     help="callable returning the torch.nn.Module to analyze")
    src.add_argument("--model", default=None, metavar="SPEC",
                     help="MODULE:FUNCTION (as --model-fn) or timm:NAME (as --timm)")
    src.add_argument("--timm", default=None, metavar="NAME", help="a timm model name (timm.create_model(NAME, **model args))")
    src.add_argument("--weights", default=None, metavar="PATH",
                     help="a saved state dict (or a dict holding one under state_dict / model_state_dict / model)")
    src.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument of the model callable (repeatable; VALUE as JSON if it parses)")
    src.add_argument("--model-args", default=None, metavar="JSON", help="keyword arguments of the model callable, a JSON object")
    dat = a.add_argument_group("data and loss")
    dat.add_argument("--data-fn", default=None, metavar="MODULE:FUNCTION",
                     help="callable returning one batch or an iterable of batches ((inputs, targets) pairs or dicts)")
    dat.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument of the data callable (repeatable; VALUE as JSON if it parses)")
    dat.add_argument("--data-args", default=None, metavar="JSON", help="keyword arguments of the data callable, a JSON object")
    dat.add_argument("--loss", default=None, metavar="NAME|MODULE:FUNCTION",
                     help=f"{', '.join(LOSSES)}, or MODULE:FUNCTION; default for dict batches: the model's own outputs.loss")
    dat.add_argument("--loss-form", choices=("outputs", "model"), default="outputs",
                     help="outputs: loss(outputs, targets) (dict batches: loss(outputs, batch)); model: loss(model, batch)")
    rep = a.add_argument_group("report")
    rep.add_argument("--out", required=True, help="output directory (created)")
    rep.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    rep.add_argument("-k", "--top-k", dest="k", type=positive_int, default=5, help="number of top eigenvalues")
    rep.add_argument("--matrix", default="hessian", help="curvature matrix: hessian, ggn or fisher (as hessopt.report has them)")
    rep.add_argument("--tol", type=positive_float, default=1e-3, help="relative tolerance of the eigenvalues")
    rep.add_argument("--trace-matvecs", type=positive_int, default=60, help="Hutch++ budget of the trace (>= 4)")
    rep.add_argument("--density-steps", type=positive_int, default=60, help="Lanczos steps of the density")
    rep.add_argument("--density-runs", type=positive_int, default=1, help="independent SLQ runs of the density")
    rep.add_argument("--no-density", action="store_true", help="skip the spectral density")
    rep.add_argument("--layerwise", action="store_true", help="also the spectrum of every layer (module)")
    rep.add_argument("--layerwise-k", type=positive_int, default=1, help="top eigenvalues per layer")
    rep.add_argument("--layerwise-trace-matvecs", type=nonneg_int, default=12, help="trace budget per layer (0: none)")
    rep.add_argument("--landscape", action="store_true",
                     help="also the loss along the top eigenvector and on a plane of two random filter-normalized directions")
    rep.add_argument("--landscape-steps", type=positive_int, default=21, help="points of the 1-D landscape")
    rep.add_argument("--landscape-grid", type=nonneg_int, default=11, help="points per axis of the 2-D landscape (0: none)")
    rep.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                     help="BatchNorm with running statistics (eval) or batch statistics (train)")
    rep.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    rep.add_argument("--seed", type=int, default=0, help="seed of all random probes and directions")
    rep.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hessopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "analyze":
            result = analyze(args)
            s = result.summary
            print(f"hessopt analyze: wrote {result.paths['json']} and {result.paths['markdown']}")
            trace = f"; trace {s.trace:.4g} +- {s.trace_std_error:.2g}" if s.trace == s.trace else ""
            print(f"  top eigenvalues {', '.join(f'{v:.4g}' for v in s.top_eigenvalues.tolist())}{trace}")
            return 0
    except CLIError as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"hessopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse rejects unknown commands


# --------------------------------------------------------------------------------------------------
# the user's code
# --------------------------------------------------------------------------------------------------

def _where(err: BaseException) -> str:
    """``file:line`` of the innermost frame of ``err`` (the user's code, usually)."""
    tb = traceback.extract_tb(err.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def resolve_callable(spec: str, option: str) -> Callable[..., Any]:
    """Import ``module.path:attr.path`` (the current directory first on ``sys.path``, as ``python -m``
    does) and return the callable; every failure is a :class:`CLIError` naming ``option``."""
    if not isinstance(spec, str) or not _SPEC.match(spec.strip()):
        raise CLIError(f"{option} {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build "
                       "(a dotted module path, a colon, a function name)")
    module_name, _, attr_path = spec.strip().partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise CLIError(f"{option} {spec}: no module named {err.name!r} (looked in the current directory "
                           f"{cwd} and on sys.path; run from the folder that holds it or set PYTHONPATH)") from err
        raise CLIError(f"{option} {spec}: importing {module_name!r} failed: {err}{_where(err)}") from err
    except Exception as err:  # noqa: BLE001 - any error in the user's module, reported without a traceback
        raise CLIError(f"{option} {spec}: importing {module_name!r} raised {type(err).__name__}: {err}"
                       f"{_where(err)}") from err
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in attr_path.split(".")[:i])
            names = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise CLIError(f"{option} {spec}: {where!r} has no attribute {part!r}"
                           + (f" (it has: {', '.join(names)})" if names else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{option} {spec}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def _kwargs(pairs: Sequence[str], blob: Optional[str], option: str) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {}
    if blob is not None:
        try:
            parsed = json.loads(blob)
        except ValueError as err:
            raise CLIError(f"--{option}s {blob!r} is not JSON: {err}") from err
        if not isinstance(parsed, dict):
            raise CLIError(f"--{option}s must be a JSON object ({{\"key\": value, ...}}), got {type(parsed).__name__}")
        kwargs.update(parsed)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise CLIError(f"--{option} {pair!r}: expected KEY=VALUE with KEY a Python identifier")
        try:
            kwargs[key.strip()] = json.loads(value)
        except ValueError:
            kwargs[key.strip()] = value  # a plain string (a path, a name)
    return kwargs


def _call(fn: Callable[..., Any], kwargs: Dict[str, Any], spec: str, option: str) -> Any:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise CLIError(f"{option} {spec} does not take the arguments {sorted(kwargs) or 'given'}: {err}") from err
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        return fn(**kwargs)
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code failed: say where, no traceback
        raise CLIError(f"{option} {spec} raised {type(err).__name__}: {err}{_where(err)}") from err


# --------------------------------------------------------------------------------------------------
# model, weights, data, loss
# --------------------------------------------------------------------------------------------------

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a device (use cpu, cuda, cuda:0, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def load_weights(path: str) -> Dict[str, Any]:
    """A state dict from ``path`` (safe loading: tensors and containers only); a :class:`CLIError`
    for a missing, empty, text, garbage or truncated file, or one that holds no state dict."""
    import torch

    p = Path(path)
    if not p.exists():
        raise CLIError(f"weights not found: {path}")
    if p.is_dir():
        raise CLIError(f"{path} is a directory; --weights takes a file saved with torch.save(model.state_dict(), PATH)")
    if p.stat().st_size == 0:
        raise CLIError(f"{path} is empty (0 bytes): not a PyTorch weights file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if refused:
            raise CLIError(f"{path} holds Python objects the safe loader refuses ({refused[0][:200]}); save a plain "
                           "state dict (torch.save(model.state_dict(), PATH)), or load the file inside your "
                           "--model-fn") from err
        raise CLIError(f"cannot read {path}: it is not a PyTorch file (a text file? truncated?): {str(err)[:200]}") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, AttributeError,
            UnicodeDecodeError, IndexError, TypeError) as err:
        raise CLIError(f"cannot read {path}: it is not a PyTorch file, or it is truncated or corrupt "
                       f"({type(err).__name__}: {str(err)[:200]})") from err
    state = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in _WEIGHT_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        what = (f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise CLIError(f"{path} holds {what}, not a state dict (name -> tensor) nor a dict holding one under "
                       f"{' / '.join(_WEIGHT_KEYS)}; save torch.save(model.state_dict(), PATH), or load your "
                       "weights inside --model-fn")
    state = dict(state)
    for prefix in ("_orig_mod.", "module."):  # torch.compile'd or DDP-wrapped models prefix every key
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    import torch

    return bool(obj) and all(isinstance(k, str) for k in obj) and \
        all(isinstance(v, torch.Tensor) for v in obj.values())


def _timm_model(name: str, kwargs: Dict[str, Any]):
    try:
        import timm
    except ImportError as err:
        raise CLIError(f"--timm {name} needs timm: pip install hessopt[timm]") from err
    kwargs = {"pretrained": False, **kwargs}
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CLIError(f"--timm {name}: timm has no model {name!r} (timm.list_models() lists them)") from err
        raise CLIError(f"--timm {name}: timm.create_model failed: {err}") from err
    except Exception as err:  # noqa: BLE001
        raise CLIError(f"--timm {name}: timm.create_model raised {type(err).__name__}: {err}") from err


def build_model(args: argparse.Namespace):
    """The model the options name, weights loaded; a :class:`CLIError` for anything wrong."""
    from torch import nn

    weights = args.weights or args.weights_path
    if args.weights and args.weights_path and args.weights != args.weights_path:
        raise CLIError("give the weights once: either the positional WEIGHTS or --weights")
    state = load_weights(weights) if weights else None  # a bad file is reported first, whatever else is missing
    sources = [s for s in (args.model_fn, args.model, args.timm) if s]
    if not sources:
        raise CLIError(
            "no model: pass --model-fn MODULE:FUNCTION (a callable returning your nn.Module) or --timm NAME"
            + (" and the weights file" if weights else "") + " (in a clone of the hessopt repository, checkpoints "
            "of its image-classification recipe: python recipes/image_classification/analyze.py CHECKPOINT --out DIR)")
    if len(sources) > 1:
        raise CLIError(f"one model source, please: got {' and '.join(sources)} (--model-fn, --model, --timm)")
    kwargs = _kwargs(args.model_arg, args.model_args, "model-arg")
    spec = sources[0]
    if args.timm or spec.startswith("timm:"):
        name = args.timm or spec[len("timm:"):]
        model, what = _timm_model(name, kwargs), f"timm model {name}"
    else:
        option = "--model-fn" if args.model_fn else "--model"
        model, what = _call(resolve_callable(spec, option), kwargs, spec, option), spec
        if not isinstance(model, nn.Module):
            raise CLIError(f"{option} {spec} returned a {type(model).__name__}, not a torch.nn.Module "
                           "(return the model, e.g. `return MyNet()`)")
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise CLIError(f"the weights in {weights} do not fit {what}: " + " ".join(lines[1:4])[:600]) from err
    return model


def _is_batch(obj: Any) -> bool:
    """One batch, by the operators' rule: a mapping, or a pair whose second element (the targets) is a tensor."""
    import torch

    if isinstance(obj, Mapping):
        return True
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor)


def build_data(args: argparse.Namespace) -> Tuple[Any, bool]:
    """``(data, mapping)``: one batch or a re-iterable collection of batches, and whether the batches
    are dicts; a :class:`CLIError` when the callable returns something else."""
    import torch

    if not args.data_fn:
        raise CLIError("no data: pass --data-fn MODULE:FUNCTION (a callable returning one (inputs, targets) batch, "
                       "a dict batch, or an iterable of them, e.g. a DataLoader of held-out data)")
    kwargs = _kwargs(args.data_arg, args.data_args, "data-arg")
    spec = args.data_fn
    data = _call(resolve_callable(spec, "--data-fn"), kwargs, spec, "--data-fn")
    expected = ("an (inputs, targets) pair with tensor targets, a dict (model(**batch)), or an iterable of them "
                "(a list, a generator, a DataLoader)")
    if _is_batch(data):
        return data, isinstance(data, Mapping)
    if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
        raise CLIError(f"--data-fn {spec} returned a {type(data).__name__}; expected {expected}")
    if isinstance(data, Iterator):  # a generator survives one pass only: the analysis makes many
        try:
            data = list(data)
        except Exception as err:  # noqa: BLE001
            raise CLIError(f"--data-fn {spec}: iterating its batches raised {type(err).__name__}: {err}{_where(err)}") from err
    try:
        first = next(iter(data), None)
    except Exception as err:  # noqa: BLE001
        raise CLIError(f"--data-fn {spec}: iterating its batches raised {type(err).__name__}: {err}{_where(err)}") from err
    if first is None:
        raise CLIError(f"--data-fn {spec} returned no batches (an empty {type(data).__name__})")
    if not _is_batch(first):
        raise CLIError(f"--data-fn {spec} returned an iterable whose first item is a {type(first).__name__}"
                       + (f" of length {len(first)}" if isinstance(first, (tuple, list)) else "")
                       + f"; each batch must be an (inputs, targets) pair with tensor targets or a dict (expected {expected})")
    return data, isinstance(first, Mapping)


def _logits(outputs: Any):
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"the model returned a {type(outputs).__name__}; a named --loss needs a tensor or an output "
                    "with .logits (or pass --loss MODULE:FUNCTION)")


def build_loss(args: argparse.Namespace, mapping: bool) -> Optional[Callable[..., Any]]:
    """The loss callable the operator gets (``None``: the model's own ``outputs.loss``)."""
    import torch.nn.functional as F

    name = args.loss
    if args.loss_form == "model":
        if not name or ":" not in name:
            raise CLIError("--loss-form model needs --loss MODULE:FUNCTION, a function loss(model, batch) -> scalar")
        return resolve_callable(name, "--loss")
    if name is None:
        if mapping:
            return None  # outputs.loss, the model's own (HuggingFace models compute it from batch["labels"])
        raise CLIError(f"pass --loss: one of {', '.join(LOSSES)}, or MODULE:FUNCTION (loss(outputs, targets) -> scalar)")
    if ":" in name:
        return resolve_callable(name, "--loss")
    key = name.strip().lower().replace("-", "_")
    if key.endswith("_loss") and key[:-5] in LOSSES:
        key = key[:-5]
    if key in ("ce", "crossentropy"):
        key = "cross_entropy"
    if key not in LOSSES:
        raise CLIError(f"--loss {name!r}: not a known loss; use one of {', '.join(LOSSES)}, or MODULE:FUNCTION")
    fn = getattr(F, LOSSES[key])

    def named_loss(outputs, targets):
        if mapping:  # loss(outputs, batch): the HuggingFace convention keeps the targets in batch["labels"]
            if "labels" not in targets:
                raise ValueError(f"--loss {name} on dict batches takes the targets from batch['labels'], which these "
                                 f"batches lack (keys: {sorted(targets)}); pass --loss MODULE:FUNCTION")
            targets = targets["labels"]
        logits = _logits(outputs)
        if key in ("cross_entropy", "nll") and logits.dim() > 2 and targets.dim() == logits.dim() - 1 \
                and targets.shape == logits.shape[:-1]:
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (B, T, C) sequences
        return fn(logits, targets)

    named_loss.__qualname__ = named_loss.__name__ = key
    return named_loss


# --------------------------------------------------------------------------------------------------
# hessopt analyze
# --------------------------------------------------------------------------------------------------

def analyze(args: argparse.Namespace):
    """Run ``hessopt analyze`` for parsed ``args``; returns the :class:`hessopt.Report` it wrote."""
    import hessopt

    device = _device(args.device)
    if args.trace_matvecs < 4:
        raise CLIError("--trace-matvecs must be at least 4 (Hutch++ needs a sketch and two residual samples)")
    model = build_model(args).to(device)
    data, mapping = build_data(args)
    loss_fn = build_loss(args, mapping)

    options = dict(out=args.out, k=args.k, seed=args.seed, progress=not args.no_progress, bn_mode=args.bn_mode,
                   density=not args.no_density, overwrite=args.overwrite, plots=not args.no_plots,
                   tol=args.tol, trace_matvecs=args.trace_matvecs, density_steps=args.density_steps,
                   density_runs=args.density_runs,
                   layerwise={"k": args.layerwise_k, "trace_matvecs": args.layerwise_trace_matvecs}
                   if args.layerwise else False,
                   landscape={"steps": args.landscape_steps, "grid": args.landscape_grid} if args.landscape else False,
                   metadata={"model": args.timm or args.model_fn or args.model,
                             "weights": str(Path(args.weights or args.weights_path).resolve())
                             if (args.weights or args.weights_path) else None,
                             "data": args.data_fn, "loss": args.loss or ("outputs.loss" if mapping else None),
                             "loss_form": args.loss_form})
    accepted = inspect.signature(hessopt.report).parameters
    target: Any = model
    if args.matrix != "hessian":
        if "matrix" not in accepted:
            raise CLIError(f"--matrix {args.matrix}: this version of hessopt.report computes the Hessian only")
        options["matrix"] = args.matrix
    if args.loss_form == "model":
        if "loss_form" in accepted:
            options["loss_form"] = "model"
        else:  # report() builds the operator itself: build it here with the loss form, for the summary
            if args.layerwise or args.landscape:
                raise CLIError("--loss-form model with --layerwise / --landscape needs a hessopt.report that takes "
                               "loss_form; drop those options, or use a loss(outputs, targets)")
            if args.matrix != "hessian":
                raise CLIError("--loss-form model is supported with --matrix hessian only")
            target = hessopt.HessianOperator(model, loss_fn, data, bn_mode=args.bn_mode, loss_form="model")
            for key in ("bn_mode", "layerwise", "landscape"):
                options.pop(key)
            loss_fn, data = None, None
    try:
        return hessopt.report(target, loss_fn, data, **options)
    except FileExistsError as err:
        raise CLIError(f"{err} (--overwrite)") from err
    except (ValueError, TypeError, ImportError) as err:
        raise CLIError(f"{type(err).__name__}: {err}{_where(err)}") from err
    except RuntimeError as err:  # typically the user's model on the user's data (shapes, dtypes, devices)
        raise CLIError(f"the analysis failed: {type(err).__name__}: {str(err)[:800]}{_where(err)} "
                       "(--debug shows the traceback)") from err


if __name__ == "__main__":  # python -m hessopt.cli
    sys.exit(main())
