"""The PyTorch adapter ``l1l2_rs.torch``: custom ops, autograd, torch.compile and training steps.

Values and gradients are checked against exact rational references (``fractions.Fraction``,
rounded once to the dtype) from ``conftest`` and ``test_training``, never against this module's own
output; bit-equality is asserted only where it is the promise (the value of ``penalty`` equals
``l1l2_rs.L1L2``'s on the same memory, compiled equals eager).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import pytest
import torch
from test_training import assert_matches, expected_accumulate, expected_prox, round_to_dtype

import l1l2_rs
import l1l2_rs.torch as lt
from conftest import BFLOAT16, assert_within_ulps, exact_penalty, penalty_ulps

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FACTORS = [(3e-3, 7e-3), (0.25, 0.0), (0.0, 0.5)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t`` in its own dtype (bfloat16 via float32, which is exact)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(BFLOAT16)
    return t.numpy().copy()


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """The numpy view of ``t``'s own memory, which ``l1l2_rs.L1L2`` reads."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def with_zeros(t: torch.Tensor) -> torch.Tensor:
    """Values of both signs and magnitudes, exact zeros (the kink of |x|) among them."""
    t.view(-1)[::5] = 0.0
    return t


def layouts(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The same kind of data laid out contiguously, transposed, every other row and as_strided."""
    g = torch.Generator().manual_seed(seed)

    def base(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)

    strided_buffer = base(200)
    return {
        "contiguous": with_zeros(base(7, 9)),
        "transposed": with_zeros(base(9, 7)).t(),
        "every_other": with_zeros(base(14, 9))[::2],
        "as_strided": with_zeros(strided_buffer).as_strided((5, 6), (1, 31), storage_offset=3),
    }


def layout_cases() -> list[Any]:
    return [
        pytest.param(dtype, name, id=f"{str(dtype)[6:]}-{name}")
        for dtype in DTYPES
        for name in ("contiguous", "transposed", "every_other", "as_strided")
    ]


# ---------------------------------------------------------------------------------------------
# penalty: values and gradients against exact references.


@pytest.mark.parametrize(("dtype", "layout"), layout_cases())
@pytest.mark.parametrize(("l1", "l2"), FACTORS)
def test_penalty_value_and_gradient_are_exact(
    dtype: torch.dtype, layout: str, l1: float, l2: float
) -> None:
    w = layouts(dtype, seed=1)[layout].requires_grad_()
    value = lt.penalty(w, l1, l2)
    assert value.dtype == dtype and value.shape == ()
    # The promise: the bits of L1L2 on the same memory, and within its accuracy of the exact value.
    assert value.item() == float(l1l2_rs.L1L2(l1, l2)(numpy_view(w)))
    expected = exact_penalty(to_numpy(w), l1, l2)
    assert_within_ulps(value.item(), expected, to_numpy(w).dtype, penalty_ulps(to_numpy(w).dtype))

    upstream = 0.75  # a loss weight: the gradient is scaled once, then rounded once
    value.backward(torch.tensor(upstream, dtype=dtype))
    assert w.grad is not None and w.grad.dtype == dtype and w.grad.shape == w.shape
    x = to_numpy(w)
    reference = expected_accumulate(x, np.zeros_like(x), l1, l2, upstream)
    assert_matches(to_numpy(w.grad), reference, x, f"grad {dtype} {layout}")


def test_gradient_at_zero_is_zero() -> None:
    w = torch.tensor([0.0, -0.0, 1.5, 0.0], requires_grad=True)
    lt.penalty(w, 0.5, 0.25).backward()
    assert w.grad is not None
    assert w.grad.tolist() == [0.0, 0.0, 0.5 + 2 * 0.25 * 1.5, 0.0]
    torch_reference = torch.autograd.grad((0.5 * w.abs()).sum(), w)[0]  # torch's own |x| at 0
    assert torch_reference[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]


def test_a_zero_factor_drops_its_term() -> None:
    w = torch.tensor([math.inf, 1.0], requires_grad=True)
    value = lt.penalty(w, 0.5, 0.0)  # the L2 term would give inf * 0 = NaN in the gradient
    assert value.item() == math.inf
    value.backward()
    assert w.grad is not None and w.grad.tolist() == [0.5, 0.5]


def test_a_non_finite_upstream_gradient_propagates() -> None:
    """AMP's GradScaler detects overflow by inf/NaN in the gradients: they must show, not raise."""
    w = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    lt.penalty(w, 0.5, 0.25).backward(torch.tensor(math.inf))
    assert w.grad is not None
    expected = math.inf * torch.tensor([0.5 + 1.0, 0.0, -0.5 - 0.5])  # IEEE: inf * 0 is NaN
    torch.testing.assert_close(w.grad, expected, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# penalty_many.


def mixed_params(seed: int) -> list[torch.Tensor]:
    """Every dtype and layout once, each requiring grad."""
    tensors = [
        layouts(dtype, seed + i)[layout]
        for i, (dtype, layout) in enumerate(
            zip(DTYPES, ("contiguous", "transposed", "every_other", "as_strided"), strict=True)
        )
    ]
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize(("l1", "l2"), FACTORS)
def test_penalty_many_value_and_gradients(l1: float, l2: float) -> None:
    params = mixed_params(seed=10)
    total = lt.penalty_many(iter(params), l1, l2, dtype=torch.float64)
    assert total.dtype == torch.float64
    # As l1l2_rs.penalty_many: the float64 sum, in order, of the per-tensor penalties ...
    per_tensor = [float(l1l2_rs.L1L2(l1, l2)(numpy_view(p))) for p in params]
    in_order = 0.0
    for value in per_tensor:
        in_order += value
    assert total.item() == in_order
    # ... each within its accuracy of the exact value.
    for p, value in zip(params, per_tensor, strict=True):
        x = to_numpy(p)
        assert_within_ulps(value, exact_penalty(x, l1, l2), x.dtype, penalty_ulps(x.dtype))

    upstream = 1.0 / 3.0
    total.backward(torch.tensor(upstream, dtype=torch.float64))
    for p in params:
        assert p.grad is not None
        x = to_numpy(p)
        reference = expected_accumulate(x, np.zeros_like(x), l1, l2, upstream)
        assert_matches(to_numpy(p.grad), reference, x, f"grad of a {p.dtype} tensor")


def test_penalty_many_dtype_is_the_promoted_dtype() -> None:
    f32 = torch.ones(3, requires_grad=True)
    f16 = torch.ones(2, dtype=torch.float16, requires_grad=True)
    bf16 = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    assert lt.penalty_many([f32, f32 * 2], 0.5).dtype == torch.float32
    assert lt.penalty_many([f16], 0.5).dtype == torch.float16
    mixed = lt.penalty_many([f16, bf16], 0.5, 0.25)
    assert mixed.dtype == torch.promote_types(torch.float16, torch.bfloat16) == torch.float32
    assert mixed.item() == 4 * 0.5 + 4 * 0.25
    loss = torch.tensor(1.0) + lt.penalty_many([f32], 0.5)
    assert loss.dtype == torch.float32  # adding it keeps a float32 loss float32
    assert lt.penalty_many([], 0.5).dtype == torch.get_default_dtype()
    assert lt.penalty_many([], 0.5, dtype=torch.float64).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_penalty_many_total_is_not_double_rounded(dtype: torch.dtype) -> None:
    """A float64 total just above a tie of ``dtype`` whose float32 rounding is the tie itself:
    rounding through float32 would give the even neighbour below."""
    precision = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24}[dtype]
    params = [
        torch.tensor([1 + 2.0**-precision], dtype=torch.float64),  # 1 + half an ulp of dtype
        torch.tensor([2.0**-40], dtype=torch.float64),  # then a little more
    ]
    total = lt.penalty_many(params, 1.0, dtype=dtype)
    exact = Fraction(1) + Fraction(1, 2**precision) + Fraction(1, 2**40)
    numpy_dtype = to_numpy(torch.zeros(1, dtype=dtype)).dtype
    assert total.item() == round_to_dtype(exact, numpy_dtype) == 1 + 2.0 ** (1 - precision)


def test_penalty_many_rounds_the_float64_total_once() -> None:
    """Three float16 tensors whose float16 penalties sum to a value between float16 neighbours."""
    params = [torch.tensor([1.0], dtype=torch.float16) for _ in range(3)]
    params.append(torch.tensor([2.0**-11], dtype=torch.float16))
    total = lt.penalty_many(params, 1.0, dtype=torch.float16)
    # 3 + 2^-11 exactly, rounded once to float16 (spacing 2^-9 at 3): 3.0
    assert total.item() == 3.0
    assert lt.penalty_many(params, 1.0, dtype=torch.float64).item() == 3 + 2.0**-11


# ---------------------------------------------------------------------------------------------
# torch's own checks: gradcheck, opcheck, torch.compile.


def away_from_zero(*shape: int, seed: int) -> torch.Tensor:
    """float64 values with |x| >= 0.1, where the finite differences of |x| are exact enough."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.1
    signs = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
    return x * signs


def test_gradcheck_penalty() -> None:
    w = away_from_zero(4, 5, seed=3).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lt.penalty(w, 0.3, 0.7), (w,))


def test_gradcheck_penalty_many() -> None:
    a = away_from_zero(3, 4, seed=4).requires_grad_()
    b = away_from_zero(6, seed=5)[::2].requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lt.penalty_many([a, b], 0.2, 0.9), (a, b))


OPCHECK_CASES = {
    "penalty-float64": lambda: (
        torch.ops.l1l2_rs.penalty,
        (away_from_zero(5, 4, seed=6), 0.1, 0.2),
    ),
    "penalty-bfloat16-strided": lambda: (
        torch.ops.l1l2_rs.penalty,
        (torch.randn(8, 6).to(torch.bfloat16).t()[::2], 0.1, 0.0),
    ),
    "penalty_many": lambda: (
        torch.ops.l1l2_rs.penalty_many,
        (mixed_params(seed=7), 0.1, 0.2, torch.float32),
    ),
    "penalty_backward": lambda: (
        torch.ops.l1l2_rs.penalty_backward,
        (torch.tensor(0.5), torch.randn(4, 3).t(), 0.1, 0.2),
    ),
    "penalty_many_backward": lambda: (
        torch.ops.l1l2_rs.penalty_many_backward,
        (torch.tensor(2.0), mixed_params(seed=8), 0.0, 0.2),
    ),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    op, args = OPCHECK_CASES[case]()
    for arg in args:  # every op has an autograd formula: checked with inputs that require grad
        for t in arg if isinstance(arg, list) else [arg]:
            if isinstance(t, torch.Tensor):
                t.requires_grad_()
    results = torch.library.opcheck(op, args, raise_exception=False)
    assert results == dict.fromkeys(results, "SUCCESS")
    assert set(results) == {
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_dynamic",
    }


def test_torch_compile_fullgraph_equals_eager() -> None:
    def loss(w: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return lt.penalty_many(params, 0.01, 0.02, dtype=torch.float64) + lt.penalty(w, 0.5, 0.25)

    def run(function: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        w = torch.randn(6, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        w = w.t().requires_grad_()
        params = mixed_params(seed=11)
        value = function(w, params)
        value.backward()
        return value.detach(), [t.grad for t in [w, *params] if t.grad is not None]

    compiled_value, compiled_grads = run(torch.compile(loss, fullgraph=True))
    eager_value, eager_grads = run(loss)
    assert torch.equal(compiled_value, eager_value)
    assert len(compiled_grads) == len(eager_grads) == 5
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        assert torch.equal(compiled, eager)


def test_a_compiled_model_loss_with_model_parameters() -> None:
    """The usual form, ``penalty_many(model.parameters())`` in a compiled loss, traces in one
    graph (backend ``aot_eager``: dynamo, fake kernels and AOT autograd, no code generation)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def loss() -> torch.Tensor:
        data = torch.nn.functional.mse_loss(model(x), y)
        return data + lt.penalty_many(model.parameters(), 1e-2, 2e-2)

    def run(function: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        model.zero_grad()
        function().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert len(eager) == len(compiled) == 4
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_add_grad_and_prox_run_eagerly_inside_compiled_code() -> None:
    """They write through numpy views: dynamo leaves them out of the graph (no backend needed)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]

    def step() -> float:
        model(x).square().mean().backward()
        total = lt.add_grad_(params, 0.1, 0.2)
        with torch.no_grad():
            for p in params:
                assert p.grad is not None
                p -= 0.1 * p.grad
        lt.prox_(params, 0.1, 0.1, 0.2)
        return total

    def run(function: Callable[[], float]) -> tuple[float, list[torch.Tensor]]:
        with torch.no_grad():
            for p, value in zip(params, start, strict=True):
                p.copy_(value)
                p.grad = None
        total = function()
        return total, [p.detach().clone() for p in params]

    eager_total, eager_params = run(step)
    compiled_total, compiled_params = run(torch.compile(step, backend="eager"))  # dynamo only
    assert compiled_total == eager_total
    for compiled, eager in zip(compiled_params, eager_params, strict=True):
        assert torch.equal(compiled, eager)
    assert not torch.equal(eager_params[0], start[0])


def test_gradgradcheck() -> None:
    w = away_from_zero(3, 4, seed=12).t().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda w: lt.penalty(w, 0.3, 0.7), (w,))
    a = away_from_zero(5, seed=13).requires_grad_()
    b = away_from_zero(2, 3, seed=14).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: lt.penalty_many([a, b], 0.2, 0.9), (a, b))


def test_hessian_is_two_l2_times_the_identity() -> None:
    w = torch.tensor([1.5, 0.0, -2.0], dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda w: lt.penalty(w, 0.25, 0.75), w)
    assert torch.equal(hessian, 1.5 * torch.eye(3, dtype=torch.float64))
    assert torch.equal(
        torch.autograd.functional.hessian(lambda w: lt.penalty(w, 0.25, 0.0), w),
        torch.zeros(3, 3, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------------------------
# add_grad_ and prox_ on mixed lists.


def test_add_grad_over_a_mixed_list() -> None:
    params = mixed_params(seed=20)
    old_grads: list[np.ndarray | None] = []
    for i, p in enumerate(params):
        if i % 2:  # odd ones have a gradient already, laid out differently from the parameter
            grad = torch.randn(tuple(reversed(p.shape)), dtype=torch.float64).to(p.dtype).t()
            p.grad = grad
            old_grads.append(to_numpy(grad))
        else:
            old_grads.append(None)
    frozen = torch.ones(3, requires_grad=False)
    l1, l2, scale = 2e-3, 5e-3, 0.5
    total = lt.add_grad_([*params, frozen], l1, l2, scale=scale)

    assert frozen.grad is None  # skipped
    assert total == l1l2_rs.penalty_many([numpy_view(p) for p in params], l1, l2)
    for p, old in zip(params, old_grads, strict=True):
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape
        x = to_numpy(p)
        base = np.zeros_like(x) if old is None else old
        assert_matches(to_numpy(p.grad), expected_accumulate(x, base, l1, l2, scale), x, "add")
        if old is None:
            assert p.grad.stride() == torch.empty_like(p).stride()  # laid out like the parameter


@pytest.mark.parametrize(("l1", "l2"), FACTORS)
def test_prox_over_a_mixed_list(l1: float, l2: float) -> None:
    params = [p.detach() for p in mixed_params(seed=30)]
    before = [to_numpy(p) for p in params]
    lr = 0.3
    assert lt.prox_(params, lr, l1, l2) is None
    for p, x in zip(params, before, strict=True):
        assert_matches(to_numpy(p), expected_prox(x, lr, l1, l2), x, f"prox {p.dtype}")


def test_prox_bumps_the_version_counter() -> None:
    """A prox step between forward and backward is caught as an in-place change, as for
    ``p.add_``."""
    w = torch.randn(4, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    lt.prox_([w], 0.1, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, and nothing touched.


def bad_input_cases() -> list[Any]:
    return [
        pytest.param(torch.empty(3, device="meta"), ValueError, "CPU tensor", id="meta"),
        pytest.param(torch.arange(3), TypeError, "dtype float16, bfloat16", id="int"),
        pytest.param(torch.ones(3, dtype=torch.bool), TypeError, "torch.bool", id="bool"),
        pytest.param(torch.ones(3, dtype=torch.complex64), TypeError, "complex64", id="complex"),
        pytest.param(torch.ones(3).to_sparse(), ValueError, "dense tensor", id="sparse"),
        pytest.param(np.ones(3), TypeError, "torch.Tensor, got ndarray", id="numpy"),
    ]


@pytest.mark.parametrize(("bad", "error", "message"), bad_input_cases())
def test_penalty_refuses_bad_input(bad: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"w must .*{message}"):
        lt.penalty(bad, 0.1)
    with pytest.raises(error, match=rf"params\[1\] must .*{message}"):
        lt.penalty_many([torch.ones(2), bad], 0.1)


def snapshot(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in tensors]


def assert_untouched(
    tensors: list[torch.Tensor], before: list[tuple[torch.Tensor, torch.Tensor | None]]
) -> None:
    for t, (value, grad) in zip(tensors, before, strict=True):
        assert torch.equal(t.detach(), value)
        if grad is None:
            assert t.grad is None
        else:
            assert t.grad is not None and torch.equal(t.grad, grad)


@pytest.mark.parametrize(("bad", "error", "message"), bad_input_cases())
def test_add_grad_and_prox_refuse_bad_input_and_touch_nothing(
    bad: Any, error: type[Exception], message: str
) -> None:
    good = mixed_params(seed=40)
    good[1].grad = torch.ones_like(good[1])
    listed = [good[0], good[1], bad, good[2]]
    before = snapshot(good)
    with pytest.raises(error, match=rf"params\[2\] must .*{message}"):
        lt.add_grad_(listed, 0.1, 0.2)
    assert_untouched(good, before)
    with pytest.raises(error, match=rf"params\[2\] must .*{message}"):
        lt.prox_(listed, 0.1, 0.1, 0.2)
    assert_untouched(good, before)


def test_add_grad_refuses_a_bad_gradient_and_touches_nothing() -> None:
    params = mixed_params(seed=50)
    params[0].grad = torch.ones_like(params[0])
    params[2].grad = torch.ones_like(params[2])
    params[2].grad.data = params[2].grad.data.to(torch.float64)  # a gradient of the wrong dtype
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"params\[2\]\.grad must have the parameter's dtype"):
        lt.add_grad_(params, 0.1, 0.2)
    assert_untouched(params, before)


def test_a_gradient_sharing_memory_with_a_parameter_is_refused_and_nothing_touched() -> None:
    frozen = torch.ones(2)
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    b.grad = a.detach()  # the same memory as a: writing it would change a
    before = snapshot([a, b])
    with pytest.raises(ValueError, match=r"overlap.*xs are the params that require grad"):
        lt.add_grad_([frozen, a, b], 0.1, 0.2)
    assert_untouched([a, b], before)


def test_prox_refuses_a_broadcast_tensor() -> None:
    p = torch.nn.Parameter(torch.ones(3).expand(2, 3))
    with pytest.raises(ValueError, match=r"broadcast.*xs are the params"):
        lt.prox_([p], 0.1, 0.1)
    assert p.tolist() == [[1.0] * 3] * 2


def test_add_grad_refuses_a_parameter_listed_twice() -> None:
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[1\] is params\[0\] again"):
        lt.add_grad_([p, p], 0.1)
    assert p.grad is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lt.penalty(torch.ones(2), -1.0), "l1 must be a finite non-negative"),
        (lambda: lt.penalty_many([torch.ones(2)], 0.1, math.nan), "l2 must be a finite"),
        (lambda: lt.add_grad_([torch.ones(2, requires_grad=True)], 0.1, scale=math.inf), "scale"),
        (lambda: lt.prox_([torch.ones(2)], -0.5, 0.1), "lr"),
        (lambda: lt.prox_(torch.ones(2), 0.5, 0.1), "params must be an iterable of tensors"),
        (lambda: lt.penalty_many([torch.ones(2)], 0.1, dtype=torch.int32), "dtype must have"),
    ],
)
def test_bad_factors_and_arguments(call: Callable[[], object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Training: 20 SGD steps of a small MLP, each way of regularizing against the plain formula.

L1, L2, LR, STEPS = 1e-2, 2e-2, 0.1, 20

#: The runs do the same float32 arithmetic except the penalty's gradient, whose elements differ from
#: the formula's by a few float32 roundings (<= 4 ulp of values <= L1 + 2*L2*|w| < 0.1: 2.4e-8),
#: so a step moves a weight differently by <= LR * 2.4e-8. Over 20 steps that is 5e-8, amplified by
#: the loss' curvature by at most (1 + LR*|H|)^20 < 200 for |H| <= 3: 1e-5. (Measured: 3e-8, one
#: or two ulp of the weights.) The regularizer moves the weights by 5e-2 over the run.
WEIGHT_TOLERANCE = 1e-5


def make_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(64, 8)
    y = torch.randn(64, 1)
    return model, x, y


def formula(params: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for w in params:
        total = total + L1 * w.abs().sum() + L2 * (w * w).sum()
    return total


def train(
    loss_penalty: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    after_backward: Callable[[list[torch.Tensor]], None] | None = None,
    after_step: Callable[[list[torch.Tensor]], None] | None = None,
    attach_mode: Literal["grad", "prox"] | None = None,
) -> list[torch.Tensor]:
    """The weights after STEPS of SGD from the same start, regularized the given way."""
    model, x, y = make_problem()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR)
    if attach_mode is not None:
        lt.attach(optimizer, L1, L2, mode=attach_mode)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if loss_penalty is not None:
            loss = loss + loss_penalty(params)
        loss.backward()
        if after_backward is not None:
            after_backward(params)
        optimizer.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(params)
    return [p.detach().clone() for p in params]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def prox_float64(params: list[torch.Tensor]) -> None:
    """The prox formula in float64, rounded to the parameter's dtype."""
    for p in params:
        x = p.double()
        shrunk = torch.clamp(x.abs() - LR * L1, min=0.0) / (1 + 2 * LR * L2)
        p.copy_(torch.sign(x) * shrunk)


@pytest.fixture(scope="module")
def unregularized() -> list[torch.Tensor]:
    return train()


@pytest.fixture(scope="module")
def with_formula() -> list[torch.Tensor]:
    return train(loss_penalty=formula)


@pytest.fixture(scope="module")
def with_prox_formula() -> list[torch.Tensor]:
    return train(after_step=prox_float64)


def assert_same_training(
    ours: list[torch.Tensor], reference: list[torch.Tensor], unregularized: list[torch.Tensor]
) -> None:
    assert max_difference(ours, reference) <= WEIGHT_TOLERANCE
    assert max_difference(ours, unregularized) > 100 * WEIGHT_TOLERANCE


def test_training_with_the_penalty_in_the_loss(
    with_formula: list[torch.Tensor], unregularized: list[torch.Tensor]
) -> None:
    ours = train(loss_penalty=lambda params: lt.penalty_many(params, L1, L2))
    assert_same_training(ours, with_formula, unregularized)
    per_tensor = train(loss_penalty=lambda params: sum(lt.penalty(p, L1, L2) for p in params))
    assert_same_training(per_tensor, with_formula, unregularized)


def test_training_with_add_grad(
    with_formula: list[torch.Tensor], unregularized: list[torch.Tensor]
) -> None:
    ours = train(after_backward=lambda params: lt.add_grad_(params, L1, L2) and None)
    assert_same_training(ours, with_formula, unregularized)
    attached = train(attach_mode="grad")
    assert_same_training(attached, with_formula, unregularized)


def test_training_with_prox(
    with_prox_formula: list[torch.Tensor], unregularized: list[torch.Tensor]
) -> None:
    ours = train(after_step=lambda params: lt.prox_(params, LR, L1, L2))
    assert_same_training(ours, with_prox_formula, unregularized)
    attached = train(attach_mode="prox")
    assert_same_training(attached, with_prox_formula, unregularized)


def test_attach_handle_removes_the_hook() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([p], lr=0.5)
    handle = lt.attach(optimizer, 0.25, 0.0, mode="prox")
    p.grad = torch.zeros(2)
    optimizer.step()
    assert p.tolist() == [1.0 - 0.5 * 0.25, -2.0 + 0.5 * 0.25]
    handle.remove()
    optimizer.step()
    assert p.tolist() == [1.0 - 0.5 * 0.25, -2.0 + 0.5 * 0.25]
    with pytest.raises(ValueError, match="mode must be 'grad' or 'prox'"):
        lt.attach(optimizer, 0.1, mode="decay")
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        lt.attach([p], 0.1)
