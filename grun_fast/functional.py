"""The gated LoReFT op: one validation, one fold, one PyTorch path, one Triton path.

Folded form (GRUN.md section 2): with A = W - R,

    [p | a] = h @ [A; w_g]^T + [b | c],   s = sigmoid(a),   out = h + (s * p) @ R

Everything that computes the intervention goes through this module:
- `gated_loreft` / `gated_loreft_logit` (raw tensors; the MLP gate passes its logit): validate, then
  - training (autograd needed): the Triton custom ops, or autograd through `fold` + `forward_folded`;
  - inference: `fold` + `forward_folded`.
- `forward_folded(h, folded, ...)`: inference on parameters folded once (the module caches them); the
  Triton forward kernel or the same folded math in PyTorch.
Which backend runs is decided by `resolve_impl` alone. Products run in the dtype of `h` (accumulating in
fp32); the gate and the scaling in fp32 (fp64 for fp64 inputs, for the float64 oracle checks).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grun_fast.errors import GRUNError

IMPLS = ("auto", "torch", "triton")
IMPL_ENV = "GRUN_FAST_IMPL"  # what "auto" means, for benchmarking: torch | triton
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_MAX_RANK = 127  # r + 1 <= 128 accumulator columns in the kernels


class Folded(NamedTuple):
    """Parameters folded once, in fp32 (fp64 for fp64 compute): R [r, d], M = [W - R; w_g] [r+1, d]
    (or [W - R] [r, d] when the gate logit comes from elsewhere), bias [b; c] [r+1] (or b [r])."""

    rotation: torch.Tensor
    matrix: torch.Tensor
    bias: torch.Tensor


def parameter_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the folded parameters, the gate and the scaling (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold(rotation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate_weight: torch.Tensor | None,
         gate_bias: torch.Tensor | None, dtype: torch.dtype) -> Folded:
    """Fold the parameters for compute dtype `dtype` (differentiable); `gate_weight=None` folds the LoReFT
    part only (the gate logit is computed elsewhere)."""
    pt = parameter_dtype(dtype)
    rot = _as(rotation, pt)
    matrix = _as(weight, pt) - rot
    biases = [_as(bias, pt).reshape(-1)]
    if gate_weight is not None:
        matrix = torch.cat([matrix, _as(gate_weight, pt).reshape(1, -1)])
        biases.append(_as(gate_bias, pt).reshape(1))
    return Folded(rot.contiguous(), matrix.contiguous(), torch.cat(biases))  # cat: a copy, never the parameter


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, skipping the `.to` call when it already is (host time: this runs on every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_inputs(h: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                 gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 gate_logit: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                 gate_threshold: float | None = None) -> tuple[torch.Tensor | None, float | None]:
    """The op's one validation; returns (rows as bool or None, threshold as float or None)."""
    _check_hidden(h)
    d = h.shape[-1]
    if rotation.dim() != 2 or rotation.shape[1] != d or rotation.shape[0] < 1:
        raise GRUNError(f"rotation must be [r, {d}] with r >= 1, got {tuple(rotation.shape)}")
    r = rotation.shape[0]
    if tuple(weight.shape) != (r, d):
        raise GRUNError(f"weight must be [{r}, {d}] like rotation, got {tuple(weight.shape)}")
    if bias.numel() != r:
        raise GRUNError(f"bias must have {r} elements, got shape {tuple(bias.shape)}")
    if gate_logit is None:
        if gate_weight is None or gate_weight.numel() != d:
            raise GRUNError(f"gate_weight must have {d} elements, got "
                            f"{None if gate_weight is None else tuple(gate_weight.shape)}")
        if gate_bias is None or gate_bias.numel() != 1:
            raise GRUNError(f"gate_bias must be a scalar ([] or [1]), got "
                            f"{None if gate_bias is None else tuple(gate_bias.shape)}")
    for name, t in (("rotation", rotation), ("weight", weight), ("bias", bias), ("gate_weight", gate_weight),
                    ("gate_bias", gate_bias)):
        if t is not None and t.device != h.device:
            raise GRUNError(f"{name} is on {t.device} but h is on {h.device}")
    return _check_per_row(h, gate_logit, rows, gate_threshold)


def check_folded(h: torch.Tensor, folded: Folded, gate_logit: torch.Tensor | None, rows: torch.Tensor | None,
                 gate_threshold: float | None) -> tuple[torch.Tensor | None, float | None]:
    """`check_inputs` for parameters that `fold` built (their shapes agree by construction): h against them,
    and the per-row inputs. Cheap, since it runs on every inference call."""
    _check_hidden(h)
    if folded.matrix.shape[1] != h.shape[-1]:
        raise GRUNError(f"h has hidden size {h.shape[-1]}, the folded parameters {folded.matrix.shape[1]}")
    if folded.matrix.device != h.device:
        raise GRUNError(f"the folded parameters are on {folded.matrix.device} but h is on {h.device}")
    linear = folded.matrix.shape[0] == folded.rotation.shape[0] + 1
    if linear == (gate_logit is not None):
        raise GRUNError("these folded parameters carry a linear gate; do not pass gate_logit" if linear
                        else "these folded parameters have no gate: pass gate_logit")
    return _check_per_row(h, gate_logit, rows, gate_threshold)


def _check_hidden(h: torch.Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] == 0:
        raise GRUNError(f"h must be [..., d] with d > 0, got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise GRUNError(f"h must be a floating tensor, got {h.dtype}")


def _check_per_row(h, gate_logit, rows, gate_threshold) -> tuple[torch.Tensor | None, float | None]:
    lead = h.shape[:-1]
    if gate_logit is not None:
        if gate_logit.shape != lead:
            raise GRUNError(f"gate_logit must have shape {tuple(lead)}, got {tuple(gate_logit.shape)}")
        if gate_logit.device != h.device:
            raise GRUNError(f"gate_logit is on {gate_logit.device} but h is on {h.device}")
    if rows is not None:
        if rows.shape != lead:
            raise GRUNError(f"rows must have shape {tuple(lead)} (h without its last dim), got {tuple(rows.shape)}")
        if rows.is_floating_point() or rows.is_complex():
            raise GRUNError(f"rows must be a bool (or integer) mask, got {rows.dtype}")
        if rows.device != h.device:
            raise GRUNError(f"rows is on {rows.device} but h is on {h.device}")
        if rows.dtype != torch.bool:
            rows = rows.to(torch.bool)
    return rows, None if gate_threshold is None else check_threshold(gate_threshold)


def check_threshold(value: object) -> float:
    """gate_threshold as a float in [0, 1], or GRUNError."""
    if isinstance(value, bool):
        raise GRUNError(f"gate_threshold must be a number in [0, 1], got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GRUNError(f"gate_threshold must be a number in [0, 1], got {value!r}") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise GRUNError(f"gate_threshold must be a number in [0, 1], got {value!r}")
    return number


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
    """Gated LoReFT on hidden states `h` [..., d] with a linear gate; returns (out, gate fp32).

    Same contract as `grun_fast.reference.gated_loreft`. Differentiable in every tensor.
    impl: "auto" (Triton on CUDA where the kernels apply, PyTorch otherwise; env GRUN_FAST_IMPL changes what
    auto picks), "torch", or "triton" (on CPU only under TRITON_INTERPRET=1).
    deterministic: the Triton backward reduces weight gradients in a fixed order (bitwise repeatable).
    """
    rows, threshold = check_inputs(h, rotation, weight, bias, gate_weight=gate_weight, gate_bias=gate_bias,
                                   rows=rows, gate_threshold=gate_threshold)
    backend = resolve_impl(impl, h, rotation.shape[0])
    if _needs_autograd(h, rotation, weight, bias, gate_weight, gate_bias):
        if backend == "triton":
            return _kernels().gated_loreft_triton(h, rotation, weight, bias, gate_weight, gate_bias, rows,
                                                  threshold, deterministic)
        return _torch_forward(h, fold(rotation, weight, bias, gate_weight, gate_bias, h.dtype), None, rows, threshold)
    with torch.no_grad():
        folded = fold(rotation, weight, bias, gate_weight, gate_bias, h.dtype)
    return _forward_folded(h, folded, None, rows, threshold, backend)


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
    """Gated LoReFT whose gate logit [...] was computed by the caller (the MLP gate); differentiable in it."""
    rows, threshold = check_inputs(h, rotation, weight, bias, gate_logit=gate_logit, rows=rows,
                                   gate_threshold=gate_threshold)
    backend = resolve_impl(impl, h, rotation.shape[0])
    if _needs_autograd(h, rotation, weight, bias, gate_logit):
        if backend == "triton":
            return _kernels().gated_loreft_logit_triton(h, rotation, weight, bias, gate_logit, rows, threshold,
                                                        deterministic)
        return _torch_forward(h, fold(rotation, weight, bias, None, None, h.dtype), gate_logit, rows, threshold)
    with torch.no_grad():
        folded = fold(rotation, weight, bias, None, None, h.dtype)
    return _forward_folded(h, folded, gate_logit, rows, threshold, backend)


def forward_folded(
    h: torch.Tensor,
    folded: Folded,
    *,
    gate_logit: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    gate_threshold: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference on parameters folded by `fold` for `h.dtype` (no autograd through the parameters)."""
    rows, threshold = check_folded(h, folded, gate_logit, rows, gate_threshold)
    return _forward_folded(h, folded, gate_logit, rows, threshold, resolve_impl(impl, h, folded.rotation.shape[0]))


def resolve_impl(impl: str, h: torch.Tensor, rank: int) -> str:
    """Which implementation runs for `h` at rank `rank`: "torch" or "triton"."""
    if impl not in IMPLS:
        raise GRUNError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto")
        if impl not in IMPLS:
            raise GRUNError(f"{IMPL_ENV}={impl!r} is not one of {', '.join(IMPLS)}")
    kernel_fits = h.dtype in KERNEL_DTYPES and rank <= KERNEL_MAX_RANK
    if impl == "auto":
        return "triton" if h.is_cuda and kernel_fits and triton_available() else "torch"
    if impl == "triton":
        if not h.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise GRUNError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if not kernel_fits:
            raise GRUNError(f"the Triton kernels take fp32/bf16/fp16 at rank <= {KERNEL_MAX_RANK}, got {h.dtype} at "
                            f"rank {rank}; use impl='auto' or 'torch'")
        if not triton_available():
            raise GRUNError("impl='triton' needs the triton package, which is not importable here")
    return impl


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    """Autograd (or tracing by torch.compile) needs the differentiable path; plain inference folds once."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _forward_folded(h, folded: Folded, gate_logit, rows, threshold, backend: str):
    if backend == "triton":
        if torch.compiler.is_compiling():  # one opaque node (decoding under torch.compile / CUDA graphs)
            return _kernels().forward_folded_op(h, folded, gate_logit, rows, threshold)
        return _kernels().forward_folded(h, folded, gate_logit, rows, threshold)
    return _torch_forward(h, folded, gate_logit, rows, threshold)


def _torch_forward(h: torch.Tensor, folded: Folded, gate_logit: torch.Tensor | None, rows: torch.Tensor | None,
                   threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: one skinny product reads `h`, one `addmm` writes `out`; unselected rows and rows
    below the threshold come back bit-identical."""
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    rank = folded.rotation.shape[0]
    acc = parameter_dtype(h.dtype)
    pa = F.linear(h2, folded.matrix.to(h.dtype)).to(acc) + folded.bias
    logit = pa[:, rank] if gate_logit is None else gate_logit.reshape(-1).to(acc)
    gate = torch.sigmoid(logit)
    scaled = (pa[:, :rank] * gate.unsqueeze(-1)).to(h.dtype)
    out = torch.addmm(h2, scaled, folded.rotation.to(h.dtype))
    keep = None if rows is None else rows.reshape(-1)
    if threshold is not None:
        keep = gate >= threshold if keep is None else keep & (gate >= threshold)
    if keep is not None:
        out = torch.where(keep.unsqueeze(-1), out, h2)
    return out.reshape(shape), gate.reshape(shape[:-1])


_TRITON_IMPORTABLE: list[bool] = []  # filled on first use (a plain global: torch.compile traces through it)


def triton_available() -> bool:
    if not _TRITON_IMPORTABLE:
        try:
            _kernels()
            _TRITON_IMPORTABLE.append(True)
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
    return _TRITON_IMPORTABLE[0]


def _kernels():
    from grun_fast.kernels import ops

    return ops
