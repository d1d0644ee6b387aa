"""GatedLoReFT: the trainable module installed at one decoder layer.

R is stored unconstrained and made orthonormal by a QR decomposition on use (sign-fixed so it is a
smooth function). Unlike torch's Householder `orthogonal` parametrisation this cannot collapse under
weight decay (GRUN.md section 8) and costs a [d, r] QR instead of a d x d map. In training it is
recomputed once per forward (once per optimiser step); for inference the orthonormal R and the folded
parameters are cached and rebuilt only when a parameter changes. Under torch.compile the cached fold is read as
is (a graph cannot check parameter versions; `patching` refolds before each generate), at fixed addresses so
that CUDA graphs read it in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grun_fast import functional
from grun_fast.errors import GRUNError


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of `matrix` [r, d] made orthonormal (Gram-Schmidt order, positive diagonal), in fp32 or better."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    q, r = torch.linalg.qr(work.transpose(0, 1))
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign).transpose(0, 1)


class GatedLoReFT(nn.Module):
    """out = h + sigmoid(g(h)) * R^T (W h + b - R h) on hidden states [..., hidden_size]."""

    def __init__(
        self,
        hidden_size: int,
        rank: int = 4,
        gate: str = "linear",
        gate_hidden: tuple[int, ...] = (256, 64),
        gate_threshold: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hidden_size:
            raise GRUNError(f"rank must be an integer in [1, hidden_size={hidden_size}], got {rank!r}")
        if gate not in ("linear", "mlp"):
            raise GRUNError(f"unknown gate {gate!r}; choose linear or mlp")
        self.hidden_size, self.rank, self.gate_kind = hidden_size, rank, gate
        self.gate_threshold = gate_threshold
        kw = {"device": device, "dtype": dtype}
        source = nn.Linear(hidden_size, rank, **kw)  # W, b: the usual Linear initialisation
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.bias = nn.Parameter(source.bias.detach().clone())
        self.rotation = nn.Parameter(orthonormalize(torch.randn(rank, hidden_size, **kw)).to(dtype))
        if gate == "linear":
            self.gate = nn.Linear(hidden_size, 1, **kw)
        else:
            widths = (hidden_size, *gate_hidden)
            layers: list[nn.Module] = []
            for width_in, width_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(width_in, width_out, **kw), nn.ReLU()]
            self.gate = nn.Sequential(*layers, nn.Linear(widths[-1], 1, **kw))
        self._gate_layers = [self.gate] if gate == "linear" else [m for m in self.gate if isinstance(m, nn.Linear)]
        self.last_gate: torch.Tensor | None = None
        self._cache: tuple | None = None

    def orthonormal_rotation(self) -> torch.Tensor:
        """R [r, d] with orthonormal rows (differentiable)."""
        return orthonormalize(self.rotation).to(self.rotation.dtype)

    def forward(
        self, h: torch.Tensor, rows: torch.Tensor | None = None, impl: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (edited h, gate per row); also keeps the gate in `last_gate`."""
        if h.shape[-1] != self.hidden_size:
            raise GRUNError(f"hidden states have size {h.shape[-1]}, this module expects {self.hidden_size}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            out, gate = self._train_forward(h, rows, impl)
        else:
            logit = None if self.gate_kind == "linear" else self._gate_logit(h)
            out, gate = functional.forward_folded(h, self.folded(h.dtype, h.device), gate_logit=logit, rows=rows,
                                                  gate_threshold=self.gate_threshold, impl=impl)
            if torch.compiler.is_compiling():  # compiled inference: the gate would leave the graph on every step
                return out, gate
        self.last_gate = gate
        return out, gate

    def _gate_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP gate's logit [...], in the dtype of `h`."""
        x = h
        for layer in self.gate:
            x = F.linear(x, layer.weight.to(h.dtype), layer.bias.to(h.dtype)) if isinstance(layer, nn.Linear) else layer(x)
        return x.squeeze(-1)

    def _train_forward(self, h, rows, impl):
        """The differentiable op on the module's parameters (R re-orthonormalised every call)."""
        rotation = self.orthonormal_rotation()
        if self.gate_kind == "linear":
            return functional.gated_loreft(
                h, rotation, self.weight, self.bias, self.gate.weight.reshape(-1), self.gate.bias,
                rows, gate_threshold=self.gate_threshold, impl=impl,
            )
        return functional.gated_loreft_logit(
            h, rotation, self.weight, self.bias, self._gate_logit(h), rows,
            gate_threshold=self.gate_threshold, impl=impl,
        )

    def folded(self, dtype: torch.dtype, device: torch.device) -> functional.Folded:
        """Orthonormal R and the folded parameters for inference: the one fold cache, rebuilt when a parameter
        changes (version counter, storage or identity). Inference tensors (parameters made or replaced under
        torch.inference_mode) carry no version counter: they are folded afresh on every call. Under torch.compile
        the cached fold is used unchecked (versions and data pointers cannot be read in a graph), else folded in
        the graph."""
        if torch.compiler.is_compiling():
            cached = None if self._cache is None else self._cache[1]
            if cached is not None and cached.matrix.dtype == functional.parameter_dtype(dtype) \
                    and cached.matrix.device == device:
                return cached
            return self._fold(dtype)
        try:
            versions = tuple((id(p), p.data_ptr(), p._version) for p in self._parameter_tensors())
        except RuntimeError:  # "Inference tensors do not track version counter"
            return self._fold(dtype)
        key = (functional.parameter_dtype(dtype), device, versions)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._refold(dtype))
        return self._cache[1]

    def _refold(self, dtype: torch.dtype) -> functional.Folded:
        """A fresh fold, written into the previous one's tensors when they fit: graphs compiled (or CUDA graphs
        captured) on them then read the new parameters without recompiling; new tensors are marked as fixed
        addresses for them."""
        with torch.inference_mode(False):  # ordinary tensors, so a later refold may write into them
            fresh = self._fold(dtype)
        old = None if self._cache is None else self._cache[1]
        if old is not None and all(o.shape == f.shape and o.dtype == f.dtype and o.device == f.device
                                   for o, f in zip(old, fresh)):
            with torch.no_grad():
                for o, f in zip(old, fresh):
                    o.copy_(f)
            return functional.Folded(*old)
        if fresh.matrix.is_cuda:  # CUDA graphs would copy other inputs on every replay
            from torch._dynamo import mark_static_address  # here, not at import time: it takes a second

            for tensor in fresh:
                mark_static_address(tensor)
        return fresh

    def _parameter_tensors(self) -> list[torch.Tensor]:
        """Every parameter, read straight from the parameter dicts (`parameters()` walks the module tree, which
        costs more than the rest of a one-row inference call)."""
        params = list(self._parameters.values())
        for layer in self._gate_layers:
            params.extend(layer._parameters.values())
        return params

    @torch.no_grad()
    def _fold(self, dtype: torch.dtype) -> functional.Folded:
        gate = (self.gate.weight.reshape(-1), self.gate.bias) if self.gate_kind == "linear" else (None, None)
        return functional.fold(self.orthonormal_rotation(), self.weight, self.bias, *gate, dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, gate={self.gate_kind}"
