r"""Register :class:`hessopt.AdaHessian` in timm's optimizer factory.

After :func:`register`, timm builds hessopt's optimizer by name::

    import hessopt.integrations.timm
    hessopt.integrations.timm.register()
    opt = timm.optim.create_optimizer_v2(model, opt="hessopt-adahessian", lr=0.15, weight_decay=5e-4 / 0.15)
    # timm's train.py: loss.backward(create_graph=second_order) with
    # second_order = getattr(opt, "is_second_order", False)  -> True for AdaHessian

For timm's own ``train.py``, the launcher :mod:`hessopt.integrations.timm.train` registers and runs
it: ``python -m hessopt.integrations.timm.train PATH/TO/train.py --opt hessopt-adahessian ...``.

**The name.** :data:`NAME` is ``"hessopt-adahessian"`` (a hyphen, no underscore). timm's
``create_optimizer`` lower-cases the name, splits it at underscores and looks up only the last part
(``"lookahead_adam"`` -> ``"adam"`` inside a ``Lookahead``; any other first part is dropped without a
word), so ``"hessopt_adahessian"`` given to a timm that hessopt did not register with builds timm's
*own* ``Adahessian``, silently. ``"hessopt-adahessian"`` has no part that timm knows: without
:func:`register`, timm refuses it (``ValueError: Optimizer hessopt-adahessian not found in
registry``). After :func:`register`, the older spelling ``"hessopt_adahessian"`` is accepted too
(mapped to :data:`NAME`), and any other name that mentions ``hessopt`` is refused instead of being
cut down to one of timm's names.

The entry is an ``OptimInfo(name="hessopt-adahessian", opt_class=hessopt.AdaHessian,
has_betas=True, second_order=True)`` in timm's ``default_registry``, so timm's parameter grouping
applies as for its own optimizers (with ``weight_decay > 0``, biases and normalization weights go
to a group without weight decay; ``weight_decay`` is AdaHessian's decoupled coefficient).

**Lookahead.** ``"lookahead_hessopt-adahessian"`` returns a :class:`SecondOrderLookahead`: timm's
``Lookahead`` (Zhang et al. 2019, slow weights every ``k=6`` steps, ``alpha=0.5``) around AdaHessian
that keeps what a second-order optimizer needs from its wrapper: ``is_second_order`` (timm's
``Lookahead`` has none before timm 1.0.31, so timm's ``train.py`` would call
``backward(create_graph=False)`` and AdaHessian's first step would fail), ``needs_hessian``,
``zero_grad`` (AdaHessian's releases the double-backward graph) and ``GradScaler``'s
``grad_scale``/``found_inf`` (so the Hessian estimate is unscaled as the gradient is).

timm's optimizer registry lives in a private module (``timm.optim._optim_factory``), so
:func:`register` only runs on the timm versions of :data:`TESTED_TIMM_RANGE` (both ends are tested;
the ``[timm]`` extra pins the same range); older ones and timm >= 1.1 are refused with a
ValueError (pass ``force=True`` to try anyway), newer 1.0.x releases get a warning.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Tuple

__all__ = ["register", "NAME", "NAMES", "TESTED_TIMM_RANGE", "SecondOrderLookahead", "lookahead"]

#: the optimizer name to pass to ``timm.optim.create_optimizer_v2`` (``--opt`` of timm's train.py)
NAME = "hessopt-adahessian"
#: every spelling :func:`register` accepts (the underscore one only once registered, see above)
NAMES: Tuple[str, ...] = (NAME, "hessopt_adahessian")
#: oldest and newest timm release the integration was tested with (setup.py: ``timm>=1.0.12,<1.1``);
#: 1.0.12 is the first release with timm's ``OptimInfo`` registry
TESTED_TIMM_RANGE: Tuple[str, str] = ("1.0.12", "1.0.31")
_REFUSED_FROM = (1, 1)  # timm 1.1 may move the private registry


def _version(text: str) -> Tuple[int, ...]:
    """``"1.0.29"`` -> ``(1, 0, 29)``; pre-release and local suffixes (``.dev0``, ``+cpu``) are dropped."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _import_timm():
    try:
        import timm
        from timm.optim import _optim_factory
    except ImportError as err:
        raise ImportError("the timm integration needs timm: pip install hessopt[timm]") from err
    return timm, _optim_factory


def _check_version(version: str, force: bool) -> None:
    low, high = TESTED_TIMM_RANGE
    v = _version(version)
    if (v < _version(low) or v[:2] >= _REFUSED_FROM) and not force:
        raise ValueError(
            f"hessopt.integrations.timm was tested with timm {low} to {high}, but timm {version} is "
            f"installed; its optimizer registry is private and may differ. Install a tested version "
            f"(pip install 'hessopt[timm]') or call register(force=True) to try anyway."
        )
    if v > _version(high) and v[:2] < _REFUSED_FROM:
        warnings.warn(f"hessopt.integrations.timm was tested with timm {low} to {high}; timm {version} "
                      f"is newer (its optimizer registry is private): check the optimizer it builds", stacklevel=3)


def register(force: bool = False) -> None:
    """Make ``timm.optim.create_optimizer_v2(model, opt="hessopt-adahessian", ...)`` return a :class:`hessopt.AdaHessian`.

    Also ``"lookahead_hessopt-adahessian"`` (a :class:`SecondOrderLookahead` around it) and the
    underscore spelling ``"hessopt_adahessian"``. Idempotent. Raises ``ValueError`` on a timm
    outside :data:`TESTED_TIMM_RANGE` (older, or 1.1 and later) unless ``force=True``, and
    ``ImportError`` (naming the ``[timm]`` extra) without timm.
    """
    timm, factory = _import_timm()
    _check_version(timm.__version__, force)
    from ...optim import AdaHessian

    registry = factory.default_registry
    known = registry._optimizers
    if NAME not in known or known[NAME].opt_class is not AdaHessian:  # idempotent: timm warns on overwrite
        registry.register(factory.OptimInfo(
            name=NAME,
            opt_class=AdaHessian,
            description="hessopt AdaHessian: Hutchinson Hessian-diagonal preconditioning (Yao et al. 2021)",
            has_eps=True,
            has_momentum=False,
            has_betas=True,
            second_order=True,
        ))
    if not getattr(registry.create_optimizer, "_hessopt_wrapped", False):
        registry.create_optimizer = _wrap_create_optimizer(registry.create_optimizer)


def _wrap_create_optimizer(original):
    @functools.wraps(original)
    def create_optimizer(model_or_params, opt: str, *args, **kwargs):
        if not isinstance(opt, str) or "hessopt" not in opt.lower():
            return original(model_or_params, opt, *args, **kwargs)  # timm's own names, unchanged
        name = opt.lower()
        use_lookahead = name.startswith("lookahead_")
        base = name[len("lookahead_"):] if use_lookahead else name
        if base not in NAMES:
            raise ValueError(
                f"unknown hessopt optimizer {opt!r} for timm: use {NAME!r} (or 'lookahead_{NAME}'); timm "
                f"itself would have kept only the part after the last underscore")
        optimizer = original(model_or_params, NAME, *args, **kwargs)
        return lookahead(optimizer) if use_lookahead else optimizer

    create_optimizer._hessopt_wrapped = True  # type: ignore[attr-defined]
    return create_optimizer


def lookahead(optimizer, alpha: float = 0.5, k: int = 6):
    """Wrap ``optimizer`` in a :class:`SecondOrderLookahead` (timm's defaults ``alpha=0.5, k=6``)."""
    return _lookahead_class()(optimizer, alpha=alpha, k=k)


@functools.lru_cache(maxsize=None)
def _lookahead_class():
    _import_timm()
    from ._lookahead import SecondOrderLookahead as cls

    return cls


def __getattr__(name: str):
    # SecondOrderLookahead subclasses timm's Lookahead: importing it needs timm, so it is built on
    # first access instead of at ``import hessopt.integrations.timm``.
    if name == "SecondOrderLookahead":
        return _lookahead_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
