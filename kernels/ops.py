"""The differentiable entry points of the fused gated LoReFT kernels (launchers in gated_loreft.py).

Inputs are validated by `grun_fast.functional` (the op's one validation), which also decides that the
kernels apply (fp32/bf16/fp16, rank <= 127, CUDA or the interpreter). Three ways in, one implementation
(`_forward` / `_backward`, the same launches and the same fold):

- `forward_folded`: inference on parameters folded once (no autograd, no dispatcher).
- Eager autograd: `_EagerOp`, a `torch.autograd.Function`. The fold of the forward is saved for the
  backward (no refold), and the weight gradients may be disjoint views of one workspace (no copies).
  Measured on the project's 2-core CPU with the launches stubbed (bench/bench_host.py): the custom-op
  dispatcher and autograd wrapper cost more host time than everything else in a training call.
- Under `torch.compile`: the custom ops `grun_fast::gated_loreft_fwd/_bwd` and
  `grun_fast::gated_loreft_logit_fwd/_bwd` (`register_fake`, `register_autograd`): one opaque node per
  call, no graph break (`fullgraph=True` works); compiled inference on a cached fold (decoding under
  torch.compile / CUDA graphs) goes through `grun_fast::gated_loreft_folded_fwd`.
"""
from __future__ import annotations

from typing import Optional

import torch

from grun_fast.functional import Folded, fold
from grun_fast.kernels import gated_loreft as K


def _fold(rotation, weight, bias, gate_weight, gate_bias) -> Folded:
    with torch.no_grad():
        return fold(rotation, weight, bias, gate_weight, gate_bias, torch.float32)


def _rows_vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-row tensor [...] as a contiguous [n] of `dtype` (views and no-op calls skipped)."""
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _prep(h, rows, logit):
    logit2 = None if logit is None else _rows_vector(logit, torch.float32)
    rows2 = None if rows is None else _rows_vector(rows, torch.bool).view(torch.int8)  # bool -> int8, no copy
    return K._flat_rows(h), logit2, rows2


def forward_folded(h: torch.Tensor, folded, logit: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                   threshold: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: one forward (two launches for few rows) on parameters folded once (`functional.Folded`, fp32).
    `out` and `gate` are allocated in their final shapes: no reshapes after the launch."""
    h2, logit2, rows2 = _prep(h, rows, logit)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    gate = torch.empty(h.shape[:-1], dtype=torch.float32, device=h.device)
    K.forward_2d(h2, folded.matrix, folded.rotation, folded.bias, logit2, rows2, threshold,
                 out=out if out.dim() == 2 else out.view(h2.shape), gate=gate)
    return out, gate


def _backward(dout, dgate, h, folded, logit, rows, threshold, deterministic, alias_ok=False):
    """Run the backward kernel; returns (dh, dR fp32, dA fp32, db fp32, the kernel's dict)."""
    h2, logit2, rows2 = _prep(h, rows, logit)
    if dout is None:
        dout = torch.zeros_like(h)
    y2 = K._flat_rows(dout)
    g2 = None if dgate is None else _rows_vector(dgate, torch.float32)
    g = K.backward_2d(h2, y2, g2, folded.matrix, folded.rotation, folded.bias, logit2, rows2, threshold,
                      deterministic, alias_ok=alias_ok)
    dh = g["dh"]
    return (dh if dh.shape == h.shape else dh.view(h.shape)), g["dR"], g["dA"], g["db"], g


def _like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`grad` (fp32, the kernel's) in the dtype and shape of `param`; no call when it already matches."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    return grad if grad.shape == param.shape else grad.reshape(param.shape)


def _param_grads(g, rotation, weight, bias, gate_weight, gate_bias, gate_logit):
    """The kernel's gradients in the dtypes and shapes of the parameters."""
    grads = [_like(g["dR"], rotation), _like(g["dA"], weight), _like(g["db"], bias)]
    if gate_logit is None:
        grads += [_like(g["dwg"], gate_weight), _like(g["dc"], gate_bias)]
    else:
        grads.append(_like(g["dlogit"], gate_logit))
    return grads


# ---- eager autograd ---------------------------------------------------------------------------------------


class _EagerOp(torch.autograd.Function):
    """Both gates: (gate_weight, gate_bias) for the linear gate, or gate_logit (the others None)."""

    @staticmethod
    def forward(ctx, h, rotation, weight, bias, gate_weight, gate_bias, gate_logit, rows, threshold, deterministic):
        folded = _fold(rotation, weight, bias, gate_weight, gate_bias)
        out, gate = forward_folded(h, folded, gate_logit, rows, threshold)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as with the custom op
        ctx.save_for_backward(h, folded.matrix, folded.rotation, folded.bias, gate_logit, rows)
        ctx.params = (rotation, weight, bias, gate_weight, gate_bias)  # dtypes and shapes only
        ctx.threshold, ctx.deterministic = threshold, deterministic
        return out, gate

    @staticmethod
    def backward(ctx, dout, dgate):
        h, matrix, rot, bias_folded, gate_logit, rows = ctx.saved_tensors
        folded = Folded(rot, matrix, bias_folded)
        dh, _, _, _, g = _backward(dout, dgate, h, folded, gate_logit, rows, ctx.threshold, ctx.deterministic,
                                   alias_ok=True)
        grads = _param_grads(g, *ctx.params, gate_logit)
        if gate_logit is None:
            return (dh, *grads, None, None, None, None)
        return (dh, *grads[:3], None, None, grads[3], None, None, None)


# ---- custom ops (what torch.compile sees) -----------------------------------------------------------------


@torch.library.custom_op("grun_fast::gated_loreft_fwd", mutates_args=())
def _op_fwd(
    h: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    gate_weight: torch.Tensor, gate_bias: torch.Tensor, rows: Optional[torch.Tensor],
    gate_threshold: Optional[float], deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_folded(h, _fold(rotation, weight, bias, gate_weight, gate_bias), None, rows, gate_threshold)


@torch.library.custom_op("grun_fast::gated_loreft_bwd", mutates_args=())
def _op_bwd(
    dout: torch.Tensor, dgate: Optional[torch.Tensor], h: torch.Tensor, rotation: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
    rows: Optional[torch.Tensor], gate_threshold: Optional[float], deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    folded = _fold(rotation, weight, bias, gate_weight, gate_bias)
    dh, _, _, _, g = _backward(dout, dgate, h, folded, None, rows, gate_threshold, deterministic)
    return (dh, *_param_grads(g, rotation, weight, bias, gate_weight, gate_bias, None))


@torch.library.custom_op("grun_fast::gated_loreft_logit_fwd", mutates_args=())
def _op_logit_fwd(
    h: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate_logit: torch.Tensor,
    rows: Optional[torch.Tensor], gate_threshold: Optional[float], deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_folded(h, _fold(rotation, weight, bias, None, None), gate_logit, rows, gate_threshold)


@torch.library.custom_op("grun_fast::gated_loreft_logit_bwd", mutates_args=())
def _op_logit_bwd(
    dout: torch.Tensor, dgate: Optional[torch.Tensor], h: torch.Tensor, rotation: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, gate_logit: torch.Tensor,
    rows: Optional[torch.Tensor], gate_threshold: Optional[float], deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    folded = _fold(rotation, weight, bias, None, None)
    dh, _, _, _, g = _backward(dout, dgate, h, folded, gate_logit, rows, gate_threshold, deterministic)
    return (dh, *_param_grads(g, rotation, weight, bias, None, None, gate_logit))


@torch.library.custom_op("grun_fast::gated_loreft_folded_fwd", mutates_args=())
def _op_folded_fwd(
    h: torch.Tensor, rotation: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor,
    gate_logit: Optional[torch.Tensor], rows: Optional[torch.Tensor], gate_threshold: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_folded(h, Folded(rotation, matrix, bias), gate_logit, rows, gate_threshold)


def _fake_out(h):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(h.shape[:-1], dtype=torch.float32)


@_op_fwd.register_fake
def _(h, rotation, weight, bias, gate_weight, gate_bias, rows, gate_threshold, deterministic):
    return _fake_out(h)


@_op_logit_fwd.register_fake
def _(h, rotation, weight, bias, gate_logit, rows, gate_threshold, deterministic):
    return _fake_out(h)


@_op_folded_fwd.register_fake
def _(h, rotation, matrix, bias, gate_logit, rows, gate_threshold):
    return _fake_out(h)


@_op_bwd.register_fake
def _(dout, dgate, h, rotation, weight, bias, gate_weight, gate_bias, rows, gate_threshold, deterministic):
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(rotation),
            torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate_weight),
            torch.empty_like(gate_bias))


@_op_logit_bwd.register_fake
def _(dout, dgate, h, rotation, weight, bias, gate_logit, rows, gate_threshold, deterministic):
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(rotation),
            torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate_logit))


def _setup_context(ctx, inputs, output):
    *tensors, rows, threshold, deterministic = inputs
    ctx.save_for_backward(*tensors, rows)
    ctx.threshold = threshold
    ctx.deterministic = deterministic


def _backward_linear(ctx, dout, dgate):
    h, rotation, weight, bias, gate_weight, gate_bias, rows = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(h)
    grads = _op_bwd(dout, dgate, h, rotation, weight, bias, gate_weight, gate_bias, rows, ctx.threshold,
                    ctx.deterministic)
    return (*grads, None, None, None)


def _backward_logit(ctx, dout, dgate):
    h, rotation, weight, bias, gate_logit, rows = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(h)
    grads = _op_logit_bwd(dout, dgate, h, rotation, weight, bias, gate_logit, rows, ctx.threshold,
                          ctx.deterministic)
    return (*grads, None, None, None)


_op_fwd.register_autograd(_backward_linear, setup_context=_setup_context)
_op_logit_fwd.register_autograd(_backward_logit, setup_context=_setup_context)


# ---- public entry points ----------------------------------------------------------------------------------


def forward_folded_op(h: torch.Tensor, folded, logit: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                      threshold: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_folded` as one custom op, for torch.compile: dynamo would otherwise trace the launcher's host
    code (launch-config memo, split-d dispatch) into the graph."""
    return _op_folded_fwd(h, folded.rotation, folded.matrix, folded.bias, logit, rows, threshold)


def gated_loreft_triton(h, rotation, weight, bias, gate_weight, gate_bias, rows, threshold, deterministic,
                        use_custom_op: bool = False):
    """Differentiable, linear gate (inputs validated by `grun_fast.functional.gated_loreft`): the custom op
    under torch.compile (or with `use_custom_op`), the eager autograd.Function otherwise."""
    if use_custom_op or torch.compiler.is_compiling():
        return _op_fwd(h, rotation, weight, bias, gate_weight, gate_bias, rows, threshold, bool(deterministic))
    return _EagerOp.apply(h, rotation, weight, bias, gate_weight, gate_bias, None, rows, threshold,
                          bool(deterministic))


def gated_loreft_logit_triton(h, rotation, weight, bias, gate_logit, rows, threshold, deterministic,
                              use_custom_op: bool = False):
    """Differentiable, given gate logit (inputs validated by `functional.gated_loreft_logit`); as above."""
    if use_custom_op or torch.compiler.is_compiling():
        return _op_logit_fwd(h, rotation, weight, bias, gate_logit, rows, threshold, bool(deterministic))
    return _EagerOp.apply(h, rotation, weight, bias, None, None, gate_logit, rows, threshold, bool(deterministic))
