"""Model and batch plumbing shared by every model-based operator (the one home for it).

A *batch* is what the user's data yields, in one of two shapes:

* a pair ``(inputs, targets)``: the model is called as ``model(inputs)`` (a tuple/list of inputs is
  unpacked as positional arguments, a dict as keyword arguments), and the loss is
  ``loss_fn(outputs, targets)``;
* a mapping (a ``dict``, HuggingFace's ``BatchEncoding``, any ``collections.abc.Mapping``): the model
  is called as ``model(**batch)`` (the HuggingFace convention), and the loss is
  ``loss_fn(outputs, batch)`` (the labels are in the batch), or, with ``loss_fn=None``, the loss the
  model computed itself: ``outputs.loss`` or ``outputs["loss"]``.

With ``loss_form="model"`` the operator does not call the model at all: ``loss_fn(model, batch)``
does, for batches of any shape (the convention of training loops that compute the loss in one
function). :func:`loss_form_of` documents and checks the rule.

The batch size that weights a batch in a data-set average is the leading dimension of the targets,
else of the first tensor found in the batch (depth first, in insertion order), unless the user gives
``batch_size=`` (a callable ``batch -> int``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "LOSS_FORMS",
    "call_model",
    "to_device",
    "is_single_batch",
    "is_mapping_batch",
    "batch_size",
    "first_tensor",
    "loss_form_of",
    "evaluate_loss",
    "model_outputs",
    "loss_of_outputs",
    "select_sample",
    "materialize",
]

#: the two ways a loss function is called (``loss_form=`` of the operators)
LOSS_FORMS = ("outputs", "model")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``; a tuple/list is unpacked as positional and a dict as keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, mappings) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        return moved if type(obj) is dict else _same_mapping_type(obj, moved)
    return obj


def _same_mapping_type(original: Mapping, items: dict) -> Mapping:
    """A mapping of the original's type when it can be rebuilt from a dict (BatchEncoding can), else a dict."""
    try:
        return type(original)(items)
    except Exception:  # noqa: BLE001 - any mapping type that cannot be rebuilt becomes a dict
        return items


def is_mapping_batch(batch: Any) -> bool:
    return isinstance(batch, Mapping)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one batch (a pair with tensor targets, or a mapping of tensors) rather than
    an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return True
    return isinstance(data, Mapping) and any(isinstance(v, torch.Tensor) for v in data.values())


def materialize(data: Any) -> Tuple[Any, bool]:
    """``(batches, single)``: the data as a re-iterable collection of batches (a one-shot iterator
    becomes a list, so that it survives many products) and whether it was one batch."""
    if is_single_batch(data):
        return [data], True
    if isinstance(data, Iterator):
        return list(data), False
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, torch.Tensor)):
        raise TypeError(
            "data must be one batch (an (inputs, targets) pair or a dict for model(**batch)) or an "
            f"iterable of batches (a list, a DataLoader), got {type(data).__name__}"
        )
    return data, False


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor with a leading dimension in ``obj`` (depth first, in order), or ``None``."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dim() > 0 else None
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch: Any, loss_form: str = "outputs", size_fn: Optional[Callable[[Any], int]] = None) -> int:
    """The number of samples of ``batch`` (its weight in a data-set average).

    ``size_fn(batch)`` when given; else for a pair the leading dimension of the targets (or of the
    first tensor of the inputs), for a mapping or a ``loss_form="model"`` batch that of its first
    tensor.
    """
    if size_fn is not None:
        n = size_fn(batch)
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = int(n.item())
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"batch_size(batch) must return a non-negative int, got {n!r}")
        return n
    if loss_form == "outputs" and isinstance(batch, (tuple, list)) and len(batch) == 2:
        candidates = (batch[1], batch[0])
    else:
        candidates = (batch,)
    for obj in candidates:
        found = first_tensor(obj)
        if found is not None:
            return int(found.shape[0])
    raise ValueError(
        "cannot tell the batch size: give targets (or inputs) with a batch dimension, or pass "
        "batch_size=<callable batch -> int> to the operator"
    )


def loss_form_of(loss_fn: Optional[Callable], loss_form: str) -> str:
    """Check the loss convention. The rule, in one place:

    * ``loss_form="outputs"`` (default): ``loss_fn(outputs, targets)``, where ``outputs`` is the
      model's output on the batch's inputs and ``targets`` the second element of a pair batch, or
      the whole batch for a mapping batch (``model(**batch)``). ``loss_fn=None``: the loss the model
      returns itself (``outputs.loss`` or ``outputs["loss"]``, HuggingFace models given labels).
    * ``loss_form="model"``: ``loss_fn(model, batch)``, which runs the model itself (any batch shape).

    The form is never guessed from the function's signature: a keyword is unambiguous.
    """
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    if loss_fn is None and loss_form == "model":
        raise ValueError("loss_form='model' needs loss_fn(model, batch) -> scalar mean loss")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            "loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss (or "
            "loss_fn(model, batch) with loss_form='model'; or None for a model that returns .loss)"
        )
    return loss_form


def _check_pair(batch: Any) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2) and not isinstance(batch, Mapping):
        length = "" if not hasattr(batch, "__len__") else f" of length {len(batch)}"
        raise ValueError(
            f"each batch must be an (inputs, targets) pair or a dict (model(**batch)); got "
            f"{type(batch).__name__}{length} (for other batch shapes use loss_form='model' with "
            "loss_fn(model, batch))"
        )


def model_outputs(model: nn.Module, batch: Any) -> Tuple[Any, Any]:
    """``(outputs, targets)`` of a pair or mapping batch (targets: the batch itself for a mapping)."""
    _check_pair(batch)
    if isinstance(batch, Mapping):
        return model(**batch), batch
    return call_model(model, batch[0]), batch[1]


def loss_of_outputs(loss_fn: Optional[Callable], outputs: Any, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, or the model's own loss when ``loss_fn`` is ``None``."""
    if loss_fn is not None:
        return loss_fn(outputs, targets)
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise ValueError(
            "loss_fn=None takes the loss the model returns (outputs.loss or outputs['loss']), but the "
            f"model returned {type(outputs).__name__} without one: include the labels in the batch "
            "(HuggingFace models compute the loss when given labels=) or pass a loss_fn"
        )
    return loss


def evaluate_loss(model: nn.Module, loss_fn: Optional[Callable], batch: Any, loss_form: str) -> torch.Tensor:
    """The batch's mean loss by the rule of :func:`loss_form_of` (not yet checked to be a scalar)."""
    if loss_form == "model":
        return loss_fn(model, batch)
    outputs, targets = model_outputs(model, batch)
    return loss_of_outputs(loss_fn, outputs, targets)


def select_sample(obj: Any, index: int, n: int) -> Any:
    """Sample ``index`` of a batch of ``n`` samples, keeping a batch dimension of 1: every tensor
    whose leading dimension is ``n`` is sliced, everything else is shared by all samples."""
    if isinstance(obj, torch.Tensor):
        return obj[index : index + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_sample(o, index, n) for o in obj)
    if isinstance(obj, Mapping):
        items = {k: select_sample(v, index, n) for k, v in obj.items()}
        return items if type(obj) is dict else _same_mapping_type(obj, items)
    return obj


def sample_dims(obj: Any, n: int) -> Any:
    """``vmap``'s ``in_dims`` for a batch: 0 for tensors with leading dimension ``n``, else ``None``."""
    if isinstance(obj, torch.Tensor):
        return 0 if obj.dim() > 0 and obj.shape[0] == n else None
    if isinstance(obj, (tuple, list)):
        return type(obj)(sample_dims(o, n) for o in obj) if isinstance(obj, tuple) else [sample_dims(o, n) for o in obj]
    if isinstance(obj, Mapping):
        return {k: sample_dims(v, n) for k, v in obj.items()}
    return None


def as_list(batches: Iterable) -> List:
    return batches if isinstance(batches, list) else list(batches)
