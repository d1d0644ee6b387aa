"""The gated LoReFT intervention written for reading: the oracle of every test.

    out = h + s * R^T (W h + b - R h),    s = sigmoid(w_g . h + c)

computed literally, with four products and no folding, in the dtype of `h`.
"""
from __future__ import annotations

import torch


def gated_loreft(
    h: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    rows: torch.Tensor | None = None,
    gate_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out, gate) for hidden states `h` [..., d].

    rotation R [r, d] (orthonormal rows), weight W [r, d], bias b [r], gate_weight [d], gate_bias [] or [1].
    rows: optional bool mask over h.shape[:-1]; unselected rows come back bit-identical.
    gate_threshold: rows whose gate is below it come back bit-identical.
    The gate is reported for every row.
    """
    logit = h @ gate_weight.to(h.dtype) + gate_bias.to(h.dtype).reshape(())
    return gated_loreft_logit(h, rotation, weight, bias, logit, rows, gate_threshold)


def gated_loreft_logit(
    h: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_logit: torch.Tensor,
    rows: torch.Tensor | None = None,
    gate_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `gated_loreft` with the gate's logit given (the MLP gate computes it)."""
    dtype = h.dtype
    R, W, b = rotation.to(dtype), weight.to(dtype), bias.to(dtype)
    gate = torch.sigmoid(gate_logit.to(dtype))
    edit = (h @ W.T + b - h @ R.T) @ R
    return apply_row_selection(h, h + gate.unsqueeze(-1) * edit, gate, rows, gate_threshold), gate


def apply_row_selection(
    h: torch.Tensor,
    edited: torch.Tensor,
    gate: torch.Tensor,
    rows: torch.Tensor | None,
    gate_threshold: float | None,
) -> torch.Tensor:
    """Keep `edited` where the row is selected and its gate reaches the threshold, else `h` exactly."""
    keep = None
    if rows is not None:
        keep = rows.to(torch.bool)
    if gate_threshold is not None:
        open_ = gate >= gate_threshold
        keep = open_ if keep is None else keep & open_
    if keep is None:
        return edited
    return torch.where(keep.unsqueeze(-1), edited, h)
