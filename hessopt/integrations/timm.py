r"""Register :class:`hessopt.AdaHessian` in timm's optimizer factory.

After :func:`register`, timm builds hessopt's optimizer by name::

    import hessopt.integrations.timm
    hessopt.integrations.timm.register()
    opt = timm.optim.create_optimizer_v2(model, opt="hessopt_adahessian", lr=0.15, weight_decay=5e-4 / 0.15)
    # timm's train.py: loss.backward(create_graph=second_order) with
    # second_order = getattr(opt, "is_second_order", False)  -> True for AdaHessian

The entry is an ``OptimInfo(name="hessopt_adahessian", opt_class=hessopt.AdaHessian,
has_betas=True, second_order=True)`` in timm's ``default_registry``, so timm's parameter grouping
applies as for its own optimizers (with ``weight_decay > 0``, biases and normalization weights go
to a group without weight decay; ``weight_decay`` is AdaHessian's decoupled coefficient).

**Why the factory is wrapped as well.** timm 1.0's ``create_optimizer`` splits the name at
underscores and looks up only the last part (``"lookahead_adam"`` -> ``"adam"`` with Lookahead), so
``"hessopt_adahessian"`` would silently build timm's own ``Adahessian``. :func:`register` therefore
also wraps ``default_registry.create_optimizer``: a name that is one of hessopt's registered names
(optionally with the ``lookahead_`` prefix) is mapped to an underscore-free alias
(``"hessoptadahessian"``) registered alongside; every other name goes to timm unchanged.

timm's optimizer registry lives in a private module (``timm.optim._optim_factory``), so
:func:`register` only runs on the timm versions it was tested with (:data:`TESTED_TIMM_VERSIONS`);
others are refused with a ValueError (pass ``force=True`` to try anyway).
"""
from __future__ import annotations

import functools
from typing import Tuple

__all__ = ["register", "TESTED_TIMM_VERSIONS", "NAME"]

#: timm versions this integration was tested against (setup.py pins the ``[timm]`` extra to these)
TESTED_TIMM_VERSIONS: Tuple[str, ...] = ("1.0.29",)
#: the optimizer name to pass to ``timm.optim.create_optimizer_v2``
NAME = "hessopt_adahessian"
_ALIAS = "hessoptadahessian"  # what timm's last-underscore-part lookup can find


def _import_timm():
    try:
        import timm
        from timm.optim import _optim_factory
    except ImportError as err:
        raise ImportError("the timm integration needs timm: pip install hessopt[timm]") from err
    return timm, _optim_factory


def register(force: bool = False) -> None:
    """Make ``timm.optim.create_optimizer_v2(model, opt="hessopt_adahessian", ...)`` return a :class:`hessopt.AdaHessian`.

    Idempotent. Raises ``ValueError`` on a timm version not in :data:`TESTED_TIMM_VERSIONS` unless
    ``force=True``, and ``ImportError`` (naming the ``[timm]`` extra) without timm.
    """
    timm, factory = _import_timm()
    if timm.__version__ not in TESTED_TIMM_VERSIONS and not force:
        raise ValueError(
            f"hessopt.integrations.timm was tested with timm {', '.join(TESTED_TIMM_VERSIONS)}, but timm "
            f"{timm.__version__} is installed; its optimizer registry is private and may have changed. "
            f"Install a tested version (pip install hessopt[timm]) or call register(force=True) to try anyway."
        )
    from ..optim import AdaHessian

    registry = factory.default_registry
    info = factory.OptimInfo(
        name=NAME,
        opt_class=AdaHessian,
        description="hessopt AdaHessian: Hutchinson Hessian-diagonal preconditioning (Yao et al. 2021)",
        has_eps=True,
        has_momentum=False,
        has_betas=True,
        second_order=True,
    )
    known = registry._optimizers
    if NAME not in known or known[NAME].opt_class is not AdaHessian:  # idempotent: timm warns on overwrite
        registry.register(info)
    if _ALIAS not in known:
        registry.register_alias(_ALIAS, NAME)
    if not getattr(registry.create_optimizer, "_hessopt_wrapped", False):
        registry.create_optimizer = _wrap_create_optimizer(registry.create_optimizer)


def _wrap_create_optimizer(original):
    @functools.wraps(original)
    def create_optimizer(model_or_params, opt: str, *args, **kwargs):
        if isinstance(opt, str):
            name = opt.lower()
            prefix = "lookahead_" if name.startswith("lookahead_") else ""
            if name[len(prefix):] == NAME:
                opt = prefix + _ALIAS
        return original(model_or_params, opt, *args, **kwargs)

    create_optimizer._hessopt_wrapped = True  # type: ignore[attr-defined]
    return create_optimizer
