"""The kernels' entry points (kernels/ops.py): eager autograd and the custom ops give the same results.

Eager training goes through `_EagerOp` (a torch.autograd.Function: the fold saved for the backward, weight
gradients as views of one workspace); torch.compile traces the custom ops. Both run the same launches on
the same fold, so in the interpreter (programs run in order, atomics in a fixed order) they must agree
bitwise, for both gates and whichever outputs the loss uses.
"""
from __future__ import annotations

import pytest
import torch

from grun_fast.kernels import ops
from tests.test_kernels import make


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


def run(entry_args, use_custom_op, uses, gate_kind, rows, threshold, deterministic, seed=0):
    leaves = [t.clone().requires_grad_() for t in entry_args]
    fn = ops.gated_loreft_triton if gate_kind == "linear" else ops.gated_loreft_logit_triton
    out, gate = fn(*leaves, rows, threshold, deterministic, use_custom_op=use_custom_op)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    if "out" in uses:
        loss = loss + (out.float() * torch.randn(out.shape, generator=g)).sum()
    if "gate" in uses:
        loss = loss + (gate * torch.randn(gate.shape, generator=g)).sum()
    loss.backward()
    return out, gate, [t.grad for t in leaves]


@pytest.mark.parametrize("gate_kind,n,dtype,uses,det", [
    ("linear", 5, torch.float32, ("out", "gate"), False),   # few rows: split-d forward
    ("linear", 40, torch.bfloat16, ("out",), True),         # row-block forward, deterministic backward
    ("linear", 20, torch.float32, ("gate",), False),        # out unused: its gradient is None in both paths
    ("logit", 3, torch.float32, ("out", "gate"), True),
    ("logit", 33, torch.bfloat16, ("out",), False),
])
def test_eager_autograd_matches_custom_op_bitwise(gate_kind, n, dtype, uses, det):
    h, R, W, b, wg, c = make((n,), 72, 4, dtype, seed=n)
    rows = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.7
    args = [h, R, W, b] + ([wg, c] if gate_kind == "linear" else [torch.randn(n) * 2])
    eager = run(args, False, uses, gate_kind, rows, 0.3, det)
    custom = run(args, True, uses, gate_kind, rows, 0.3, det)
    assert torch.equal(eager[0], custom[0]) and torch.equal(eager[1], custom[1])
    for i, (a, b_) in enumerate(zip(eager[2], custom[2])):
        assert a is not None and a.dtype == b_.dtype and a.shape == b_.shape == args[i].shape, i
        assert torch.equal(a, b_), i


def test_eager_weight_gradients_do_not_overlap():
    """The eager backward hands out views of one workspace: disjoint ranges, so an optimizer or clipping
    writing one gradient in place cannot change another."""
    h, R, W, b, wg, c = make((6,), 48, 3, torch.float32, seed=2)
    _, _, grads = run([h, R, W, b, wg, c], False, ("out", "gate"), "linear", None, None, False)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in grads)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    before = [t.clone() for t in grads]
    grads[2].mul_(0)  # dW
    assert all(torch.equal(t, s) for i, (t, s) in enumerate(zip(grads, before)) if i != 2)
