r"""Run timm's own ``train.py`` with hessopt's optimizers registered.

::

    python -m hessopt.integrations.timm.train PATH/TO/timm/train.py ARGS...
    # e.g. ... train.py --data-dir DATA --model resnet18 --opt hessopt-adahessian --lr 0.15 --weight-decay 3.3e-3

**Where train.py comes from.** It is not in the timm wheel: it sits at the root of timm's git
repository (``huggingface/pytorch-image-models`` on GitHub). Take the tag of the timm you have
installed, so that script and library agree (the script imports the ``timm/`` package beside it
first, exactly as ``python train.py`` would)::

    TIMM=$(python -c "import timm; print(timm.__version__)")
    git clone --depth 1 --branch v$TIMM https://github.com/huggingface/pytorch-image-models timm-src
    python -m hessopt.integrations.timm.train timm-src/train.py --opt hessopt-adahessian ...

**What the launcher does**, in this order:

1. Attention. A Hessian-vector product needs the derivative of attention's backward, which
   PyTorch's fused scaled-dot-product kernels do not have. timm's attention layers call
   ``F.scaled_dot_product_attention`` when timm's fused attention is on (its default), else they
   write attention out (``softmax(q k^T * scale) v``), which is twice differentiable. The launcher
   sets ``TIMM_FUSED_ATTN=0`` before timm is imported (and turns timm's flag off if timm was
   imported already). If you set ``TIMM_FUSED_ATTN`` to a non-zero value yourself, it is kept and
   the script runs inside :func:`hessopt.second_order_safe` instead, which routes every
   ``F.scaled_dot_product_attention`` call to a fused forward with a twice-differentiable
   graph-building backward (for the whole run, with its small per-call overhead).
2. ``sys.argv`` becomes ``[train.py, ARGS...]`` and the script's folder goes first on
   ``sys.path``, as with ``python train.py``.
3. :func:`hessopt.integrations.timm.register`: ``--opt hessopt-adahessian`` (also
   ``hessopt_adahessian`` and ``lookahead_hessopt-adahessian``) builds :class:`hessopt.AdaHessian`,
   whose ``is_second_order`` makes ``train.py`` call ``backward(create_graph=True)``.
4. ``--opt`` is checked: a name that timm would cut at an underscore to another of its names
   (timm keeps only the part after the last underscore: ``myadahessian_adamw`` -> ``adamw``) is
   refused, and timm's own ``adahessian`` gets a warning that names hessopt's.
5. The script runs as ``__main__`` (``runpy.run_path``).

Without the launcher (``python train.py --opt hessopt_adahessian`` on a timm that hessopt did not
register with), timm silently builds its own ``Adahessian``; ``--opt hessopt-adahessian`` is
refused by timm instead ("not found in registry"), which is why the hyphen is the name to use.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys
import warnings
from typing import List, Optional, Sequence

__all__ = ["main", "check_opt"]

USAGE = "usage: python -m hessopt.integrations.timm.train PATH/TO/timm/train.py [train.py arguments ...]"


def _opt_values(args: Sequence[str]) -> List[str]:
    """The values given to ``--opt`` (``--opt X`` or ``--opt=X``; argparse takes the last)."""
    values = []
    for i, arg in enumerate(args):
        if arg == "--opt" and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith("--opt="):
            values.append(arg.split("=", 1)[1])
    return values


def check_opt(name: str) -> None:
    """Refuse an ``--opt`` that timm would silently read as another name; warn for timm's own AdaHessian.

    timm's factory splits the (lower-cased) name at underscores, keeps a leading ``lookahead`` as a
    flag and looks up only the last part. hessopt's names are handled by the registration (see
    :mod:`hessopt.integrations.timm`).
    """
    from . import NAME

    lowered = name.lower()
    if "hessopt" in lowered:
        return  # register()'s factory accepts hessopt's spellings and refuses the others itself
    parts = lowered.split("_")
    dropped = parts[1:-1] if parts[0] == "lookahead" else parts[:-1]
    if len(parts) > 1 and dropped:
        raise ValueError(
            f"--opt {name}: timm would read this as {parts[-1]!r} and drop {'_'.join(dropped)!r}; "
            f"give timm's name itself (or 'lookahead_{parts[-1]}'), or {NAME!r} for hessopt's AdaHessian")
    if parts[-1] == "adahessian":
        warnings.warn(f"--opt {name} builds timm's own Adahessian, not hessopt's: use --opt {NAME}", stacklevel=2)


def _attention_mode() -> str:
    """Set timm's fused-attention switch for Hessian steps; 'math' or 'routed' (see the module docstring)."""
    value = os.environ.get("TIMM_FUSED_ATTN")
    if value is not None and value.strip() not in ("", "0"):
        return "routed"
    os.environ["TIMM_FUSED_ATTN"] = "0"
    layers = sys.modules.get("timm.layers")
    if layers is not None and hasattr(layers, "set_fused_attn"):
        layers.set_fused_attn(False)  # timm already imported: its config read the variable before
    return "math"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE)
        if not argv:
            raise SystemExit(2)
        return
    script, args = os.path.abspath(argv[0]), argv[1:]
    if not os.path.isfile(script):
        raise SystemExit(f"hessopt.integrations.timm.train: {argv[0]} is not a file.\n{USAGE}\n"
                         "train.py is not in the timm wheel: get it from timm's git repository at the tag of the "
                         "installed timm (see `python -m hessopt.integrations.timm.train --help`).")
    for name in _opt_values(args):
        check_opt(name)
    mode = _attention_mode()
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))  # as `python train.py`: the script's folder first

    from . import register  # imports timm, from the script's folder if it holds timm/ (a clone)

    register()
    import timm

    print(f"hessopt: optimizers registered in timm {timm.__version__}; attention: "
          + ("TIMM_FUSED_ATTN=0 (written out)" if mode == "math" else "fused, routed by hessopt.second_order_safe()"),
          file=sys.stderr)
    if mode == "routed":
        from ...hvp import second_order_safe

        context = second_order_safe()
    else:
        context = contextlib.nullcontext()
    with context:
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
