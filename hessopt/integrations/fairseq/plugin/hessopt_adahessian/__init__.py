"""fairseq ``--user-dir`` entry point: registers ``--optimizer adahessian``.

fairseq imports this folder as the top-level module ``hessopt_adahessian``; all it does is import
:mod:`hessopt.integrations.fairseq.optimizer`, whose ``register_optimizer`` call registers the
optimizer. If ``hessopt`` is not importable (e.g. a source checkout that is not pip-installed),
the checkout this folder belongs to is put on ``sys.path`` first.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("hessopt") is None:
    # .../<root>/hessopt/integrations/fairseq/plugin/hessopt_adahessian/__init__.py -> <root>
    _root = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 5))
    sys.path.insert(0, _root)

import hessopt.integrations.fairseq.optimizer  # noqa: E402,F401  (registers "adahessian")
