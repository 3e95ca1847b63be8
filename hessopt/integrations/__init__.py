"""Integrations of hessopt with training frameworks.

* :mod:`hessopt.integrations.timm` — ``register()`` puts :class:`hessopt.AdaHessian` into timm's
  optimizer factory as ``"hessopt-adahessian"`` (``second_order=True``; also with Lookahead);
  ``python -m hessopt.integrations.timm.train PATH/TO/timm/train.py ARGS`` runs timm's own script.
* :mod:`hessopt.integrations.fairseq` — a ``--user-dir`` plugin for fairseq.

Each integration lives in its own module or subpackage and imports its framework lazily, with an
error that names the pip extra to install (e.g. ``pip install 'hessopt[fairseq]'``). Importing this
package imports no framework.
"""
