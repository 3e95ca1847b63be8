"""fairseq integration: AdaHessian as ``fairseq-train --optimizer adahessian``.

fairseq loads out-of-tree components with ``--user-dir DIR`` and imports ``DIR`` as a top-level
module named after the folder. A folder called ``fairseq`` collides with fairseq itself ("module
name is not globally unique"), so the ``--user-dir`` folder is :data:`USER_DIR`,
``hessopt/integrations/fairseq/plugin/hessopt_adahessian``; it only imports
:mod:`hessopt.integrations.fairseq.optimizer`, which registers the optimizer::

    fairseq-train DATA --user-dir $(python -m hessopt.integrations.fairseq) \\
        --optimizer adahessian --lr 0.047 --adahessian-betas '(0.9, 0.98)' --adahessian-eps 1e-4 \\
        --weight-decay 1e-4 --block-length 32 --lr-scheduler inverse_sqrt --warmup-updates 8000 ...

``python -m hessopt.integrations.fairseq`` prints that folder. From Python (after ``import fairseq``):
``from hessopt.integrations.fairseq import FairseqAdaHessian, FairseqAdaHessianConfig``.

What works with which fairseq options is documented in :mod:`hessopt.integrations.fairseq.optimizer`.
Importing the optimizer without fairseq raises an ImportError that names the ``[fairseq]`` extra.
"""
from __future__ import annotations

import os

__all__ = ["USER_DIR", "FairseqAdaHessian", "FairseqAdaHessianConfig", "UnsupportedFairseqOption"]

#: The folder to pass to ``fairseq-train --user-dir``.
USER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin", "hessopt_adahessian")

_LAZY = ("FairseqAdaHessian", "FairseqAdaHessianConfig", "UnsupportedFairseqOption")


def __getattr__(name):
    # fairseq is heavy and optional: it is imported only when the optimizer itself is asked for.
    if name in _LAZY:
        from . import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
