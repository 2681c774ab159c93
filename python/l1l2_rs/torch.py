"""The L1/L2 penalty for PyTorch: differentiable ops and in-place training steps on CPU tensors.

Two ways to regularize a model:

* In the loss: ``loss = loss_fn(model(x), y) + l1l2_rs.torch.penalty_many(model.parameters(),
  l1, l2)``. ``penalty`` and ``penalty_many`` are ``torch.library`` custom ops (namespace
  ``l1l2_rs``) with an autograd formula and fake kernels, so they work under ``torch.compile`` and
  pass ``torch.library.opcheck``.
* Outside autograd, after ``loss.backward()``: ``add_grad_`` adds the penalty's gradient into each
  ``p.grad``, or ``prox_`` takes the proximal step after ``optimizer.step()``; ``attach`` hooks
  either onto an optimizer. These run eagerly, one native call over the whole list.

Everything reads the tensors' memory in place, in any layout (the native kernels take strided
numpy views): float16, bfloat16, float32 and float64 CPU tensors. A CUDA, meta or sparse tensor, or
one of another dtype, raises (``ValueError`` / ``TypeError`` naming the argument): nothing is
copied to the host behind your back.

The gradient is ``l1 * sign(w) + 2 * l2 * w`` with ``sign(0) = 0``: at exactly 0 the gradient of
the L1 term is 0, as for ``torch.abs``. A factor of exactly zero drops its term (as
``keras.regularizers.L1L2``), so NaN or inf in ``w`` cannot leak through a disabled term.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import ml_dtypes
import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from . import _l1l2_rs
from .regularizers import _factor

__all__ = ["add_grad_", "attach", "penalty", "penalty_many", "prox_"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EXPECTED_DTYPES = "float16, bfloat16, float32 or float64"
_NARROW_NUMPY_TYPES: dict[torch.dtype, Any] = {
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
}

NumpyArray = np.ndarray[Any, np.dtype[Any]]


# ---------------------------------------------------------------------------------------------
# Checks and zero-copy views.


def _check_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` if the native kernels can read it in place; else a ``TypeError``/``ValueError``."""
    if (
        isinstance(x, torch.Tensor)
        and x.is_cpu
        and x.layout == torch.strided
        and x.dtype in _FLOAT_DTYPES
    ):
        return x  # the common case, in as few attribute reads as possible
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"l1l2_rs.torch: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"l1l2_rs.torch: {name} must be a dense tensor, got layout {x.layout}")
    if not x.is_cpu:
        raise ValueError(
            f"l1l2_rs.torch: {name} must be a CPU tensor, got one on {x.device}; l1l2_rs "
            "computes on the host and does not copy tensors there (use the torch formula on "
            "that device, or move the tensor yourself)"
        )
    _check_dtype(name, x.dtype)
    return x


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"l1l2_rs.torch: {name} must have dtype {_EXPECTED_DTYPES}, got {dtype}")


def _numpy_view(x: torch.Tensor) -> NumpyArray:
    """A numpy array sharing ``x``'s memory, strides and all (bfloat16 as ``ml_dtypes``')."""
    if x.requires_grad:
        x = x.detach()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the 16-bit words
        view: NumpyArray = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return view
    return x.numpy()


def _terms(l1: float, l2: float) -> tuple[float | None, float | None]:
    """The native form of the factors: a zero factor drops its term (``None``)."""
    return l1 or None, l2 or None


def _checked_factors(l1: object, l2: object) -> tuple[float, float]:
    return _factor("l1", l1, 0.0), _factor("l2", l2, 0.0)


# ---------------------------------------------------------------------------------------------
# The custom ops. Their implementations run on real CPU tensors; the fake kernels give shapes
# and dtypes to torch.compile.


@torch.library.custom_op("l1l2_rs::penalty", mutates_args=(), device_types="cpu")
def _penalty_op(w: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    _check_tensor("w", w)
    value = _l1l2_rs.penalty(_numpy_view(w), *_terms(l1, l2))
    return torch.tensor(float(value), dtype=w.dtype)  # exact: value has w's dtype


@_penalty_op.register_fake
def _penalty_fake(w: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    _check_dtype("w", w.dtype)
    return w.new_empty(())


@torch.library.custom_op("l1l2_rs::penalty_backward", mutates_args=(), device_types="cpu")
def _penalty_backward_op(grad: torch.Tensor, w: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """``grad * (l1 * sign(w) + 2 * l2 * w)`` in ``w``'s dtype (``grad`` is 0-dim)."""
    _check_tensor("w", w)
    out = torch.empty_like(w)
    _scaled_grads([w], [out], l1, l2, grad)
    return out


@_penalty_backward_op.register_fake
def _penalty_backward_fake(
    grad: torch.Tensor, w: torch.Tensor, l1: float, l2: float
) -> torch.Tensor:
    return torch.empty_like(w)


@torch.library.custom_op("l1l2_rs::penalty_many", mutates_args=(), device_types="cpu")
def _penalty_many_op(
    params: list[torch.Tensor], l1: float, l2: float, dtype: torch.dtype
) -> torch.Tensor:
    for index, p in enumerate(params):
        _check_tensor(f"params[{index}]", p)
    total = _l1l2_rs.penalty_many([_numpy_view(p) for p in params], *_terms(l1, l2))
    return _rounded_once(total, dtype)


def _rounded_once(value: float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` rounded once to ``dtype``, as a 0-dim tensor.

    ``torch.tensor(value, dtype=torch.float16)`` rounds through float32 (twice: 1 + 2^-11 + 2^-40
    becomes 1.0, not 1 + 2^-10); numpy and ml_dtypes round a float64 to float16 and bfloat16
    directly, and the rounded value is then exact in any dtype.
    """
    narrow = _NARROW_NUMPY_TYPES.get(dtype)
    if narrow is not None:
        with np.errstate(over="ignore"):  # overflow to inf is the right answer
            value = float(narrow(value))
    return torch.tensor(value, dtype=dtype)


@_penalty_many_op.register_fake
def _penalty_many_fake(
    params: list[torch.Tensor], l1: float, l2: float, dtype: torch.dtype
) -> torch.Tensor:
    return params[0].new_empty((), dtype=dtype)


@torch.library.custom_op("l1l2_rs::penalty_many_backward", mutates_args=(), device_types="cpu")
def _penalty_many_backward_op(
    grad: torch.Tensor, params: list[torch.Tensor], l1: float, l2: float
) -> list[torch.Tensor]:
    """``grad * (l1 * sign(p) + 2 * l2 * p)`` of every ``p``, in one native call."""
    for index, p in enumerate(params):
        _check_tensor(f"params[{index}]", p)
    outs = [torch.empty_like(p) for p in params]
    _scaled_grads(params, outs, l1, l2, grad)
    return outs


@_penalty_many_backward_op.register_fake
def _penalty_many_backward_fake(
    grad: torch.Tensor, params: list[torch.Tensor], l1: float, l2: float
) -> list[torch.Tensor]:
    return [torch.empty_like(p) for p in params]


def _scaled_grads(
    xs: list[torch.Tensor], outs: list[torch.Tensor], l1: float, l2: float, grad: torch.Tensor
) -> None:
    """Write ``grad * gradient(x)`` into each ``out``, in one native call.

    The native kernel folds a finite ``grad`` into the factors and rounds once. A non-finite
    upstream gradient (AMP's loss-scale overflow) is applied afterwards with IEEE rules, so an inf
    still shows in the gradients instead of raising.
    """
    scale = float(grad)
    finite = math.isfinite(scale)
    _l1l2_rs.value_and_grad_many(
        [_numpy_view(x) for x in xs],
        *_terms(l1, l2),
        [_numpy_view(out) for out in outs],
        False,
        scale if finite else 1.0,
    )
    if not finite:
        for out in outs:
            out.mul_(scale)


def _penalty_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    w, ctx.l1, ctx.l2 = inputs
    ctx.save_for_backward(w)


def _penalty_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    (w,) = ctx.saved_tensors
    return _penalty_backward_op(grad, w, ctx.l1, ctx.l2), None, None


def _penalty_many_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    params, ctx.l1, ctx.l2, _ = inputs
    ctx.save_for_backward(*params)


def _penalty_many_backward(
    ctx: Any, grad: torch.Tensor
) -> tuple[list[torch.Tensor], None, None, None]:
    params = list(ctx.saved_tensors)
    return _penalty_many_backward_op(grad, params, ctx.l1, ctx.l2), None, None, None


# Second derivatives, for Hessian-vector products and gradient penalties. The backward ops
# compute g = grad * t(w) with t(w) = l1 * sign(w) + 2 * l2 * w, so dg/dgrad = t(w) and
# dg/dw = grad * 2 * l2 (the derivative of sign is 0, as torch's for abs).


def _backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    grad, ws, ctx.l1, ctx.l2 = inputs
    ctx.many = isinstance(ws, list)
    ctx.save_for_backward(grad, *(ws if ctx.many else [ws]))


def _backward_backward(ctx: Any, upstream: Any) -> tuple[Any, Any, None, None]:
    grad, *ws = ctx.saved_tensors
    upstreams = upstream if ctx.many else [upstream]
    ones = torch.ones_like(grad)
    terms = _penalty_many_backward_op(ones, ws, ctx.l1, ctx.l2)  # t(w), one native call
    grad_of_grad = sum(
        (torch.sum(u * t, dtype=torch.float64) for u, t in zip(upstreams, terms, strict=True)),
        start=torch.zeros((), dtype=torch.float64),
    ).to(grad.dtype)
    grads_of_ws = [
        u * (grad * (2 * ctx.l2)).to(u.dtype) if ctx.l2 else torch.zeros_like(w)
        for u, w in zip(upstreams, ws, strict=True)
    ]
    return grad_of_grad, grads_of_ws if ctx.many else grads_of_ws[0], None, None


_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)
_penalty_many_op.register_autograd(_penalty_many_backward, setup_context=_penalty_many_setup)
for _op in (_penalty_backward_op, _penalty_many_backward_op):
    _op.register_autograd(_backward_backward, setup_context=_backward_setup)


# ---------------------------------------------------------------------------------------------
# The differentiable penalty.


def penalty(w: torch.Tensor, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum(|w|) + l2 * sum(w**2)`` as a 0-dim tensor of ``w``'s dtype, differentiable.

    The value has the bits of ``l1l2_rs.L1L2(l1, l2)(w.detach().numpy())`` (float64 sums, one
    rounding to ``w``'s dtype); a zero factor drops its term. The gradient is
    ``l1 * sign(w) + 2 * l2 * w``, 0 at ``w == 0`` for the L1 term (as ``torch.abs``), scaled by
    the upstream gradient and rounded once. ``w``: a float16, bfloat16, float32 or float64 CPU
    tensor in any layout, read in place. Works under ``torch.compile(fullgraph=True)``. Twice
    differentiable: the Hessian is ``2 * l2`` times the identity (the L1 term's is 0, as for
    ``torch.abs``).
    """
    _check_tensor("w", w)
    value: torch.Tensor = _penalty_op(w, *_checked_factors(l1, l2))
    return value


def penalty_many(
    params: Iterable[torch.Tensor],
    l1: float = 0.0,
    l2: float = 0.0,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The sum of ``penalty(p, l1, l2)`` over ``params``, as a 0-dim tensor, differentiable.

    The value is ``l1l2_rs.penalty_many``'s: the float64 sum, in order, of the per-tensor penalties
    (each rounded to its tensor's dtype), rounded once to ``dtype``. ``dtype`` defaults to the
    promoted dtype of ``params`` (float32 for float32 parameters, as summing per-tensor torch
    penalties would give, so adding it to a float32 loss keeps the loss float32); pass
    ``torch.float64`` for the full float64 total. An empty list gives a zero of ``dtype``
    (default: torch's default dtype). The backward pass computes every gradient in one native call
    (each as ``penalty``'s). ``params`` may be a generator, such as ``model.parameters()``.
    """
    tensors = list(params)
    for index, p in enumerate(tensors):
        _check_tensor(f"params[{index}]", p)
    if dtype is None:
        dtype = _promoted_dtype(tensors)
    _check_dtype("dtype", dtype)
    factors = _checked_factors(l1, l2)
    if not tensors:
        return torch.zeros((), dtype=dtype)
    total: torch.Tensor = _penalty_many_op(tensors, *factors, dtype)
    return total


def _promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    for p in tensors[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# In-place training steps. They write through numpy views, so they always run eagerly (a compiled
# function that calls them runs them outside the graph).

_F = TypeVar("_F", bound=Callable[..., Any])


def _always_eager(function: _F) -> _F:
    """``function`` excluded from ``torch.compile``'s tracing (``torch.compiler.disable``)."""
    disable: Any = torch.compiler.disable  # untyped in torch
    disabled: _F = disable(function)
    return disabled


@_always_eager
@torch.no_grad()
def add_grad_(
    params: Iterable[torch.Tensor], l1: float = 0.0, l2: float = 0.0, *, scale: float = 1.0
) -> float:
    """Add ``scale`` times the penalty's gradient into each ``p.grad``; return the total penalty.

    Call it after ``loss.backward()`` and before ``optimizer.step()``. One native call covers the
    whole list; a missing ``p.grad`` is created (zeros plus the gradient, laid out like ``p``).
    Parameters with ``requires_grad=False`` are skipped: they are frozen, and a ``.grad`` on them
    would make the optimizer move them. The return value is the float64 sum of the penalties of
    the parameters used (as ``l1l2_rs.penalty_many``; ``scale`` does not apply to it), for
    logging. Every tensor and gradient is checked first: an error leaves all of them untouched.
    """
    tensors = _checked_list(params)
    factors = _checked_factors(l1, l2)
    used = [(index, p) for index, p in enumerate(tensors) if p.requires_grad]
    if len({id(p) for _, p in used}) != len(used):
        _refuse_repeats(used)
    grads = [_grad_or_zeros(index, p) for index, p in used]
    skipped = len(used) < len(tensors)
    with _native_names("params that require grad" if skipped else "params", "their .grad"):
        total = _l1l2_rs.value_and_grad_many(
            [_numpy_view(p) for _, p in used],
            *_terms(*factors),
            [_numpy_view(g) for g in grads],
            True,
            scale,
        )[0]
    for (_, p), g in zip(used, grads, strict=True):
        if p.grad is None:
            p.grad = g
        else:
            _bump_version(g)
    return total


def _refuse_repeats(used: list[tuple[int, torch.Tensor]]) -> None:
    """A tensor listed twice would get its gradient added twice into one ``.grad``: refuse it."""
    first: dict[int, int] = {}
    for index, p in used:
        earlier = first.setdefault(id(p), index)
        if earlier != index:
            raise ValueError(
                f"l1l2_rs.torch: params[{index}] is params[{earlier}] again; list each "
                "parameter once (model.parameters() does)"
            )


def _grad_or_zeros(index: int, p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` checked as a destination, or new zeros laid out like ``p`` (not yet attached)."""
    grad = p.grad
    if grad is None:
        return torch.zeros_like(p)
    if grad.dtype == p.dtype and grad.shape == p.shape and not grad.requires_grad:
        return _check_tensor(f"params[{index}].grad", grad)
    name = f"params[{index}].grad"
    _check_tensor(name, grad)
    if grad.dtype != p.dtype or grad.shape != p.shape:
        raise ValueError(
            f"l1l2_rs.torch: {name} must have the parameter's dtype {p.dtype} and shape "
            f"{tuple(p.shape)}, got {grad.dtype} and {tuple(grad.shape)}"
        )
    if grad.requires_grad:
        raise ValueError(
            f"l1l2_rs.torch: {name} requires grad (backward(create_graph=True)); add_grad_ "
            "writes in place outside autograd: add the penalty to the loss instead"
        )
    return grad


@_always_eager
@torch.no_grad()
def prox_(params: Iterable[torch.Tensor], lr: float, l1: float = 0.0, l2: float = 0.0) -> None:
    """The proximal step of ``lr * penalty`` on every tensor of ``params``, in place.

    ``p <- sign(p) * max(|p| - lr * l1, 0) / (1 + 2 * lr * l2)`` (soft-thresholding: exact zeros
    where ``|p| <= lr * l1``), one native call for the whole list. Call it after
    ``optimizer.step()`` with the step's learning rate. Every tensor given is updated, frozen or
    not (``attach`` passes only the parameters the optimizer stepped). ``lr`` finite and >= 0.
    Every tensor is checked first: an error leaves all of them untouched.
    """
    tensors = _checked_list(params)
    factors = _checked_factors(l1, l2)
    with _native_names("params", None):
        _l1l2_rs.prox_many_([_numpy_view(p) for p in tensors], lr, *_terms(*factors))
    for p in tensors:
        _bump_version(p)


@contextlib.contextmanager
def _native_names(xs: str, outs: str | None) -> Iterator[None]:
    """Say which tensors the native ``xs``/``outs`` (and their positions) are in its errors."""
    try:
        yield
    except ValueError as error:
        naming = f"xs are the {xs}" + (f", outs {outs}" if outs else "")
        raise ValueError(f"{error} [{naming}, positions counted from 0]") from error


def _bump_version(x: torch.Tensor) -> None:
    """Tell autograd that ``x`` changed in place (as torch's in-place ops do), so a saved copy of
    it fails loudly in ``backward`` instead of being used stale."""
    torch.autograd.graph.increment_version(x)


def _checked_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "l1l2_rs.torch: params must be an iterable of tensors, got a single tensor "
            "(wrap it in a list)"
        )
    tensors = list(params)
    for index, p in enumerate(tensors):
        _check_tensor(f"params[{index}]", p)
    return tensors


def attach(
    optimizer: torch.optim.Optimizer,
    l1: float = 0.0,
    l2: float = 0.0,
    *,
    mode: Literal["grad", "prox"] = "grad",
) -> RemovableHandle:
    """Regularize every step of ``optimizer``; ``handle.remove()`` detaches it again.

    ``mode="grad"``: before each step, ``add_grad_`` over the parameters that have a ``.grad``
    (those the optimizer will update, as its own ``weight_decay`` does), one native call.
    ``mode="prox"``: after each step, ``prox_`` with each parameter group's current ``lr`` over
    the parameters that have a ``.grad``, one native call per group (the proximal step of SGD;
    with momentum or Adam it is the usual heuristic, not an exact proximal method).
    Optimizers that re-evaluate the loss inside ``step(closure)`` (LBFGS) recompute the gradient
    after the pre-hook: put ``penalty_many`` in the closure's loss instead.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"l1l2_rs.torch: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    factors = _checked_factors(l1, l2)
    if mode == "grad":
        return optimizer.register_step_pre_hook(_grad_hook(*factors))
    if mode == "prox":
        return optimizer.register_step_post_hook(_prox_hook(*factors))
    raise ValueError(f"l1l2_rs.torch: mode must be 'grad' or 'prox', got {mode!r}")


def _stepped(group: dict[str, Any]) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def _grad_hook(l1: float, l2: float) -> Any:
    def add_penalty_grad(
        optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        params = [p for group in optimizer.param_groups for p in _stepped(group)]
        add_grad_(params, l1, l2)

    return add_penalty_grad


def _prox_hook(l1: float, l2: float) -> Any:
    def prox_step(
        optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        for group in optimizer.param_groups:
            prox_(_stepped(group), float(group["lr"]), l1, l2)

    return prox_step
