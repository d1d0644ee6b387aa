"""gated_loreft(): the one entry point of the intervention, dispatching to Triton or PyTorch.

The PyTorch path uses the folded form of GRUN.md section 2: with A = W - R,

    [p | a] = h @ [A; w_g]^T + [b | c],   s = sigmoid(a),   out = h + (s * p) @ R

one skinny product reads `h`, one `addmm` writes `out`. Products run in the dtype of `h` (accumulating in
fp32 inside the matmul); the gate and the scaling run in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grun_fast.errors import GRUNError
from grun_fast.reference import apply_row_selection

IMPLS = ("auto", "torch", "triton")
IMPL_ENV = "GRUN_FAST_IMPL"  # what "auto" means, for benchmarking: torch | triton


class Folded(NamedTuple):
    """Parameters folded for the PyTorch path: R [r, d] and M = [W - R; w_g] [r+1, d] in the compute dtype,
    bias [b; c] [r+1] in fp32."""

    rotation: torch.Tensor
    matrix: torch.Tensor
    bias: torch.Tensor


def fold(
    rotation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> Folded:
    """Fold the parameters once; `gate_weight=None` folds the LoReFT part only (gate computed elsewhere)."""
    rows = [weight - rotation]
    biases = [bias]
    if gate_weight is not None:
        rows.append(gate_weight.reshape(1, -1))
        biases.append(gate_bias.reshape(1))
    return Folded(rotation.to(dtype), torch.cat(rows).to(dtype), torch.cat(biases).to(accumulation_dtype(dtype)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the gate and scaling (fp64 stays fp64, for the float64 oracle checks)."""
    return torch.promote_types(dtype, torch.float32)


def gated_loreft(
    h: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    gate_threshold: float | None = None,
    impl: str = "auto",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated LoReFT on hidden states `h` [..., d] with a linear gate; returns (out, gate).

    Same contract as `grun_fast.reference.gated_loreft`; `gate` is fp32. Differentiable in every tensor.
    impl: "auto" (Triton on CUDA, PyTorch otherwise; env GRUN_FAST_IMPL changes what auto picks),
    "torch", or "triton" (on CPU only under TRITON_INTERPRET=1).
    deterministic: the Triton backward reduces weight gradients in a fixed order (bitwise repeatable).
    """
    if resolve_impl(impl, h) == "triton":
        return _kernels().gated_loreft_triton(
            h, rotation, weight, bias, gate_weight, gate_bias, rows=rows, gate_threshold=gate_threshold,
            deterministic=deterministic,
        )
    folded = fold(rotation, weight, bias, gate_weight, gate_bias, h.dtype)
    return gated_loreft_folded(h, folded, rows=rows, gate_threshold=gate_threshold)


def gated_loreft_logit(
    h: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_logit: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    gate_threshold: float | None = None,
    impl: str = "auto",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated LoReFT whose gate logit [...] was computed by the caller (the MLP gate)."""
    if resolve_impl(impl, h) == "triton":
        return _kernels().gated_loreft_logit_triton(
            h, rotation, weight, bias, gate_logit, rows=rows, gate_threshold=gate_threshold,
            deterministic=deterministic,
        )
    folded = fold(rotation, weight, bias, None, None, h.dtype)
    return gated_loreft_folded(h, folded, gate_logit=gate_logit, rows=rows, gate_threshold=gate_threshold)


def gated_loreft_folded(
    h: torch.Tensor,
    folded: Folded,
    *,
    gate_logit: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    gate_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path on pre-folded parameters (the module caches `folded` for inference)."""
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    rank = folded.rotation.shape[0]
    acc = accumulation_dtype(h.dtype)
    pa = F.linear(h2, folded.matrix).to(acc) + folded.bias
    logit = pa[:, rank] if gate_logit is None else gate_logit.reshape(-1).to(acc)
    gate = torch.sigmoid(logit)
    scaled = (pa[:, :rank] * gate.unsqueeze(-1)).to(h.dtype)
    out = torch.addmm(h2, scaled, folded.rotation)
    flat_rows = None if rows is None else rows.reshape(-1)
    out = apply_row_selection(h2, out, gate, flat_rows, gate_threshold)
    return out.reshape(shape), gate.reshape(shape[:-1])


def resolve_impl(impl: str, h: torch.Tensor) -> str:
    """Which implementation runs for `h`: "torch" or "triton"."""
    if impl not in IMPLS:
        raise GRUNError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto")
        if impl not in IMPLS:
            raise GRUNError(f"{IMPL_ENV}={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if h.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not h.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise GRUNError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if not triton_available():
            raise GRUNError("impl='triton' needs the triton package, which is not importable here")
    return impl


@functools.cache
def triton_available() -> bool:
    try:
        _kernels()
    except ImportError:
        return False
    return True


def _kernels():
    from grun_fast.kernels import gated_loreft as kernels

    return kernels
