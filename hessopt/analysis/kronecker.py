r"""Kronecker-factored approximation of a layer's Hessian, and how well it explains the exact one.

**Construction** (Wu, Zhu et al., *Dissecting Hessian: Understanding Common Structure of Hessian
in Neural Networks*, 2020, following the K-FAC idea of Martens & Grosse 2015). Take a linear layer
:math:`y = W x` (:math:`W \in \mathbb R^{m\times d}`) inside a network with outputs
:math:`f \in \mathbb R^C` and mean loss :math:`L = \frac1N\sum_n \ell(f_n, t_n)`. Flatten
:math:`W` row-major, :math:`w = \operatorname{vec}_r(W)` (index :math:`o\cdot d + i`, PyTorch's
``weight.reshape(-1)``). Since :math:`\partial y_o / \partial W_{o'i} = \delta_{oo'} x_i`, the
Jacobian of one sample's layer output is :math:`\partial y_n/\partial w = I_m \otimes x_n^\top`.
By the chain rule

.. math::  \nabla^2_w L = \frac1N\sum_n (I\otimes x_n)\, M_n\, (I\otimes x_n^\top)
           + \frac1N\sum_n \sum_o \frac{\partial \ell_n}{\partial y_{n,o}} \nabla^2_w y_{n,o},

and the last term vanishes because :math:`y` is linear in :math:`w`. Here :math:`M_n` is the
Hessian of :math:`\ell_n` with respect to the layer output :math:`y_n`; its Gauss-Newton part is
the output Hessian back-propagated through the rest of the network,
:math:`M_n = J_n^\top H_n J_n` with :math:`J_n = \partial f_n/\partial y_n` and
:math:`H_n = \nabla^2_f \ell_n` (for softmax cross-entropy :math:`H_n = \operatorname{diag}(p_n) -
p_n p_n^\top`; for squared error a multiple of the identity). The residual term
:math:`\sum_c \partial_{f_c}\ell\, \nabla^2_y f_c` is zero for networks that are piecewise linear
after the layer (ReLU, max-pooling, eval-mode BatchNorm), so there the layer Hessian *is* the
Gauss-Newton block, exactly:

.. math::  H_W = \frac1N\sum_n M_n \otimes x_n x_n^\top  \qquad (\text{since } (I\otimes x) M (I\otimes x^\top) = M\otimes xx^\top).

The **decoupling conjecture** of the Dissecting Hessian paper replaces the mean of Kronecker
products by the Kronecker product of means:

.. math::  H_W \approx \mathbb E[M] \otimes \mathbb E[x x^\top] = S \otimes A .

Its eigenpairs are products of the factors' eigenpairs: if :math:`S u_a = \lambda_a u_a` and
:math:`A v_b = \mu_b v_b`, then :math:`(S\otimes A)(u_a\otimes v_b) = \lambda_a\mu_b\, u_a\otimes
v_b`. So the top eigenvalues of the approximation are the largest products :math:`\lambda_a\mu_b`,
its eigenvectors reshape to rank-one matrices :math:`u_a v_b^\top`, and when :math:`A` has one
dominant eigenvalue (post-ReLU inputs have a large mean, :math:`A \approx \bar x \bar x^\top + \dots`)
the top eigenspace is :math:`\{u_a \otimes v_1\}_{a\le C}`: this explains the paper's rank-one
reshaped eigenvectors and the roughly :math:`C` outlier eigenvalues.

**Convolutions** (``nn.Conv2d``, ``groups=1``) are linear in :math:`W` (``(out, in*kh*kw)``) acting
on unfolded patches :math:`u_{n,p}` at output positions :math:`p=1..P`. The exact block is
:math:`\frac1N\sum_n\sum_{p,q} M_n^{(pq)}\otimes u_{n,p}u_{n,q}^\top` (:math:`M^{(pq)}` couples the
outputs at positions :math:`p` and :math:`q`). Two Kronecker approximations of the weight-shared
layer (Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures", NeurIPS 2023):

* ``positions="expand"`` (default; KFC of Grosse & Martens 2016): keep the :math:`p = q` terms
  (spatially uncorrelated derivatives) and factor them as :math:`S = \mathbb E_n[\sum_p M_n^{(pp)}]`,
  :math:`A = \mathbb E_{n,p}[u_{n,p}u_{n,p}^\top]`. Exact when the cross-position terms vanish.
* ``positions="reduce"``: sum the output Jacobians and average the patches over positions first,
  :math:`\bar J_n = \sum_p J_n^{(p)}`, :math:`\bar u_n = \frac1P\sum_p u_{n,p}`, and take
  :math:`S = \mathbb E_n[\bar J_n^\top H_n \bar J_n]`, :math:`A = \mathbb E_n[\bar u_n \bar u_n^\top]`.
  Exact when the patches do not vary over positions; it keeps the cross-position terms that a
  global average pooling after the layer makes as large as the diagonal ones (there "expand"
  underestimates the top eigenvalues by up to a factor :math:`P`).

An ``nn.Linear`` applied to ``(N, ..., d)`` inputs is treated the same way, with the middle
dimensions as positions; for ``(N, d)`` inputs (:math:`P = 1`) the two coincide.

What is computed: :math:`S` and :math:`A` (float64) over the given batches, with
:math:`J_n` obtained by :math:`C` backward passes (one per output unit; fine for tens of classes)
and :math:`H_n` by ``torch.func.hessian`` of ``loss_fn`` on one sample (so any per-sample loss
works); the top-:math:`k` eigenpairs of :math:`S\otimes A`; and, with ``exact=True``, the exact
top-:math:`k` eigenpairs of the layer's weight Hessian (:class:`hessopt.HessianOperator` with
``params=[layer.weight]``) and the overlap of the two top eigenspaces. The model runs in eval mode
(samples must be independent for per-sample curvature), BatchNorm with its running statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..results import dataclass_dict
from .._checks import check_positive_int
from ..operators import (
    HessianOperator,
    LambdaOperator,
    _is_single_batch,
    _operator_mode,
    _to_device,
    call_model,
)
from ..probes import GeneratorLike
from ..spectrum import top_eigenvalues

from .overlap import eigenspace_overlap

__all__ = ["KroneckerFactors", "kronecker_factors"]


@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
    r"""The Kronecker approximation :math:`S \otimes A` of one layer's weight Hessian.

    Attributes:
        layer: the layer's name in the model.
        weight_shape: the layer weight's shape; vectors are laid out as ``weight.reshape(-1)``.
        output_factor: ``S = E[M]`` (``(out, out)``, float64), the back-propagated output curvature.
        input_factor: ``A = E[x x^T]`` (``(d, d)``, float64; ``d = in*kh*kw`` for a conv).
        num_samples: samples averaged over.
        positions: output positions per sample (1 for an ``nn.Linear`` on ``(N, d)`` inputs).
        mode: ``"expand"`` or ``"reduce"`` (how positions were folded into the factors).
        eigenvalues: ``(k,)`` float64, top eigenvalues of ``S (x) A`` (descending).
        eigenvectors: ``(n, k)`` their eigenvectors ``u_a (x) v_b`` (the weight's dtype).
        factor_indices: ``(k, 2)``: for each eigenpair, the index ``a`` of the output factor's and
            ``b`` of the input factor's eigenpair (both in descending order).
        exact_eigenvalues, exact_eigenvectors: top-``k`` eigenpairs of the exact layer Hessian
            (``None`` unless ``exact=True``).
        overlap: overlap of the two top-``k`` eigenspaces (``None`` unless ``exact=True``).
        ggn: the exact dense Gauss-Newton block ``(1/N) sum_n sum_pq M_n^(pq) (x) u_p u_q^T``
            (``None`` unless ``return_ggn=True``; small layers only).
    """

    layer: str
    weight_shape: Tuple[int, ...]
    output_factor: torch.Tensor = dataclasses.field(repr=False)
    input_factor: torch.Tensor = dataclasses.field(repr=False)
    num_samples: int
    positions: int
    mode: str
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor = dataclasses.field(repr=False)
    factor_indices: torch.Tensor = dataclasses.field(repr=False)
    exact_eigenvalues: Optional[torch.Tensor] = None
    exact_eigenvectors: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)
    overlap: Optional[float] = None
    ggn: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    _skip_in_dict = ("output_factor", "input_factor", "eigenvectors", "exact_eigenvectors", "ggn")

    def to_dict(self) -> Dict[str, Any]:
        return dataclass_dict(self)

    def matrix(self) -> torch.Tensor:
        """The dense ``S (x) A`` (float64; ``n x n`` with ``n = weight.numel()``: small layers only)."""
        return torch.kron(self.output_factor.contiguous(), self.input_factor.contiguous())

    def operator(self) -> LambdaOperator:
        """``S (x) A`` as an operator, applied without forming it: ``vec_r(V) -> vec_r(S V A)``."""
        S, A = self.output_factor, self.input_factor
        m, d = S.shape[0], A.shape[0]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            V = v.reshape(m, d).to(S.dtype)
            return (S @ V @ A).reshape(-1).to(v.dtype)

        return LambdaOperator(matvec, m * d, dtype=torch.float64, device=S.device)


def _find_layer(model: nn.Module, layer: Union[str, nn.Module]) -> Tuple[str, nn.Module]:
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise ValueError(f"no module named {layer!r} in the model; Linear/Conv2d layers are {linear}")
        name, module = layer, modules[layer]
    elif isinstance(layer, nn.Module):
        names = {id(m): n for n, m in model.named_modules()}
        if id(layer) not in names:
            raise ValueError("the layer is not a module of the model")
        name, module = names[id(layer)], layer
    else:
        raise TypeError(f"layer must be a module of the model or its name, got {type(layer).__name__}")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"layer {name!r}: grouped/depthwise convolutions (groups={module.groups}) are not supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; kronecker_factors supports nn.Linear and nn.Conv2d")
    if not module.weight.requires_grad:
        raise ValueError(f"layer {name!r} has a frozen weight (requires_grad=False)")
    return name, module


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("padding='same' with an even effective kernel pads asymmetrically: not supported")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, P, d)``: one row per output position, laid out like ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Conv2d):
        u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=_conv_padding(module), stride=module.stride)
        return u.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _output_jacobian_layout(module: nn.Module, J: torch.Tensor) -> torch.Tensor:
    """``(N, C, *y.shape[1:])`` to ``(N, C, P, out)``."""
    N, C = J.shape[:2]
    if isinstance(module, nn.Conv2d):
        return J.reshape(N, C, J.shape[2], -1).transpose(2, 3)
    return J.reshape(N, C, -1, J.shape[-1])


def _per_sample_output_hessians(loss_fn: Callable, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """``(N, C, C)`` Hessians of ``loss_fn(f_n[None], t_n[None])`` in ``f_n``."""
    def single(o, t):
        return loss_fn(o[None], t[None])

    f = outputs.detach()
    try:
        return torch.func.vmap(torch.func.hessian(single))(f, targets)
    except Exception:  # some losses do not vmap (data-dependent control flow): one sample at a time
        return torch.stack([torch.func.hessian(single)(f[n], targets[n]) for n in range(f.shape[0])])


def _check_mean_loss(loss_fn: Callable, f: torch.Tensor, targets: Any) -> None:
    """The per-sample construction needs ``loss_fn(batch) == mean of loss_fn(sample)``: check it."""
    batch_loss = float(loss_fn(f, targets))
    single = [float(loss_fn(f[n : n + 1], targets[n : n + 1])) for n in range(min(f.shape[0], 8))]
    mean_first = float(loss_fn(f[: len(single)], targets[: len(single)]))
    mean_single = sum(single) / len(single)
    if abs(mean_first - mean_single) > 1e-4 * max(1.0, abs(mean_first)) or batch_loss != batch_loss:
        raise ValueError(
            "loss_fn is not the mean over samples of a per-sample loss (on the first samples: "
            f"{mean_first:.6g} for the batch vs {mean_single:.6g} averaged one by one); use reduction='mean'"
        )


def _split(inputs: Any, targets: Any, chunk: int) -> List[Tuple[Any, Any]]:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor) or inputs.shape[0] <= chunk:
        return [(inputs, targets)]
    return list(zip(inputs.split(chunk), targets.split(chunk)))


def kronecker_factors(
    model: nn.Module,
    layer: Union[str, nn.Module],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    k: int = 10,
    exact: bool = True,
    return_ggn: bool = False,
    tol: float = 1e-3,
    max_matvecs: Optional[int] = None,
    generator: GeneratorLike = None,
    chunk_size: int = 128,
    positions: str = "expand",
) -> KroneckerFactors:
    r"""The Kronecker approximation ``E[M] (x) E[x x^T]`` of a Linear/Conv2d layer's weight Hessian.

    See the module docstring for the derivation. For a single ``nn.Linear`` model with squared
    error the approximation is exact: ``M`` is a constant multiple of the identity.

    Args:
        model: the network; its outputs must be ``(N, C)`` (logits or regression outputs).
        layer: an ``nn.Linear`` or ``nn.Conv2d`` of ``model``, or its name.
        loss_fn: ``loss_fn(outputs, targets)``, a *mean over samples* of a per-sample loss (checked).
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        k: number of top eigenpairs of the approximation (and of the exact Hessian).
        exact: also compute the exact layer Hessian's top-``k`` eigenpairs (Lanczos on
            :class:`hessopt.HessianOperator`, eval mode) and the overlap of the two eigenspaces.
        return_ggn: also return the dense exact Gauss-Newton block (``n x n``: tiny layers only).
        tol, max_matvecs, generator: for the exact eigenpairs (:func:`hessopt.top_eigenvalues`).
        chunk_size: samples per forward pass (memory: ``chunk * C * P * out`` numbers for ``J``).
        positions: ``"expand"`` (KFC) or ``"reduce"``: how positions of a conv (or of a Linear on
            sequences) enter the factors; see the module docstring. Irrelevant for ``P = 1``.

    Returns:
        :class:`KroneckerFactors`.

    Example:
        >>> kf = kronecker_factors(model, "fc1", nn.CrossEntropyLoss(), (x, y), k=10)
        >>> kf.overlap, kf.eigenvalues[:3], kf.exact_eigenvalues[:3]
    """
    name, module = _find_layer(model, layer)
    if positions not in ("expand", "reduce"):
        raise ValueError(f"positions must be 'expand' or 'reduce', got {positions!r}")
    check_positive_int("k", k)
    W = module.weight
    n_weight = W.numel()
    k = min(k, n_weight)
    device = W.device
    batches = [data] if _is_single_batch(data) else list(data)
    if not batches:
        raise ValueError("data is empty: pass at least one (inputs, targets) batch")
    S = A = G = None
    n_total, np_total, num_pos = 0, 0, 1
    captured: Dict[str, torch.Tensor] = {}

    def hook(mod, inp, out):
        captured["x"], captured["y"] = inp[0].detach(), out

    handle = module.register_forward_hook(hook)
    try:
        with _operator_mode(model, "eval"), torch.enable_grad():
            for batch in batches:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ValueError("each batch must be an (inputs, targets) pair")
                inputs, targets = _to_device(batch[0], device), _to_device(batch[1], device)
                for x_in, t in _split(inputs, targets, chunk_size):
                    captured.clear()
                    f = call_model(model, x_in)
                    if "y" not in captured:
                        raise ValueError(f"layer {name!r} was not called in the forward pass")
                    if not isinstance(f, torch.Tensor) or f.dim() != 2:
                        raise ValueError("kronecker_factors needs model outputs of shape (N, C)")
                    Hn = _per_sample_output_hessians(loss_fn, f, t).to(torch.float64)
                    _check_mean_loss(loss_fn, f.detach(), t)
                    y = captured["y"]
                    N, C = f.shape
                    J = torch.stack(
                        [torch.autograd.grad(f[:, c].sum(), y, retain_graph=c < C - 1)[0] for c in range(C)], dim=1
                    )
                    J = _output_jacobian_layout(module, J).to(torch.float64)  # (N, C, P, out)
                    u = _patches(module, captured["x"]).to(torch.float64)  # (N, P, d)
                    num_pos = u.shape[1]
                    HJ = torch.einsum("ncd,ndpo->ncpo", Hn, J)
                    if positions == "expand":
                        s = torch.einsum("ncpo,ncpq->oq", J, HJ)
                        a = torch.einsum("npi,npj->ij", u, u)
                    else:
                        Jbar, ubar = J.sum(2), u.mean(1)
                        s = torch.einsum("nco,ncd,ndq->oq", Jbar, Hn, Jbar)
                        a = ubar.T @ ubar * num_pos  # normalized by N * P below
                    S = s if S is None else S + s
                    A = a if A is None else A + a
                    if return_ggn:
                        g = torch.einsum("ncpo,ncqr,npi,nqj->oirj", J, HJ, u, u).reshape(n_weight, n_weight)
                        G = g if G is None else G + g
                    n_total += N
                    np_total += N * num_pos
    finally:
        handle.remove()
    S = S / n_total
    A = A / np_total
    S = (S + S.T) / 2
    A = (A + A.T) / 2
    lam, U = torch.linalg.eigh(S)
    mu, V = torch.linalg.eigh(A)
    lam, U, mu, V = lam.flip(0), U.flip(1), mu.flip(0), V.flip(1)  # descending
    products = lam[:, None] * mu[None, :]
    order = torch.argsort(products.reshape(-1), descending=True)[:k]
    ia, ib = order // mu.numel(), order % mu.numel()
    eigenvalues = products.reshape(-1)[order].cpu()
    vectors = torch.stack([torch.kron(U[:, a], V[:, b]) for a, b in zip(ia.tolist(), ib.tolist())], dim=1)
    exact_vals = exact_vecs = overlap = None
    if exact:
        op = HessianOperator(model, loss_fn, batches[0] if len(batches) == 1 else batches, params=[W], bn_mode="eval")
        res = top_eigenvalues(op, k=k, tol=tol, max_matvecs=max_matvecs, generator=generator)
        exact_vals, exact_vecs = res.eigenvalues.cpu(), res.eigenvectors.detach()
        overlap = eigenspace_overlap(vectors, exact_vecs, orthonormalize=True)
    return KroneckerFactors(
        layer=name,
        weight_shape=tuple(W.shape),
        output_factor=S,
        input_factor=A,
        num_samples=n_total,
        positions=num_pos,
        mode=positions,
        eigenvalues=eigenvalues,
        eigenvectors=vectors.to(W.dtype),
        factor_indices=torch.stack([ia, ib], dim=1).cpu(),
        exact_eigenvalues=exact_vals,
        exact_eigenvectors=exact_vecs,
        overlap=overlap,
        ggn=None if G is None else G / n_total,
    )
