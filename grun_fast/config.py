"""GRUNConfig: which layers get a gated LoReFT module, and how it edits.

Validation happens here, at construction, so a bad value fails before any model is touched.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from grun_fast.errors import GRUNError

GATES = ("linear", "mlp")
POSITIONS = ("last_prompt", "all", "mask")


@dataclass
class GRUNConfig:
    """Configuration of one GRUN adapter (one module per chosen decoder layer).

    layers: decoder layer indices whose output hidden states are edited; negative counts from the end.
    rank: rank r of the LoReFT edit.
    gate: "linear" (d -> 1) or "mlp" (d -> 256 -> 64 -> 1, ReLU).
    positions: "last_prompt" (paper behaviour: the last prompt token, prefill only), "all" (every token,
        decode steps included) or "mask" (only where `grun_fast.edit_at(model, mask=...)` says).
    gate_threshold: rows whose gate is below it are returned bit-identical (None: always edit).
    gate_hidden: hidden widths of the MLP gate.
    """

    layers: list[int]
    rank: int = 4
    gate: str = "linear"
    positions: str = "last_prompt"
    gate_threshold: float | None = None
    gate_hidden: tuple[int, ...] = (256, 64)

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        try:
            layers = [int(layer) for layer in self.layers]
        except (TypeError, ValueError):
            raise GRUNError(f"layers must be a list of integers, got {self.layers!r}") from None
        if not layers:
            raise GRUNError("layers must name at least one decoder layer")
        if any(isinstance(layer, bool) for layer in self.layers) or layers != list(self.layers):
            raise GRUNError(f"layers must be a list of integers, got {self.layers!r}")
        self.layers = layers
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise GRUNError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.gate not in GATES:
            raise GRUNError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.positions not in POSITIONS:
            raise GRUNError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if self.gate_threshold is not None:
            t = self.gate_threshold
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
                raise GRUNError(f"gate_threshold must be None or a number in [0, 1], got {t!r}")
            self.gate_threshold = float(t)
        hidden = self.gate_hidden
        if (isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable)
                or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in hidden)):
            raise GRUNError(f"gate_hidden must be a sequence of integer widths, got {hidden!r}")
        self.gate_hidden = tuple(int(w) for w in hidden)
        if any(w < 1 for w in self.gate_hidden):
            raise GRUNError(f"gate_hidden widths must be >= 1, got {self.gate_hidden!r}")

    def resolve_layers(self, num_layers: int) -> list[int]:
        """Layer indices made non-negative and checked against a model with `num_layers` layers."""
        resolved = []
        for layer in self.layers:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise GRUNError(
                    f"layer index {layer} is out of range for a model with {num_layers} decoder layers "
                    f"(valid: {-num_layers} .. {num_layers - 1})"
                )
            resolved.append(index)
        if len(set(resolved)) != len(resolved):
            raise GRUNError(f"layers {self.layers} name the same decoder layer twice")
        return resolved

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gate_hidden"] = list(self.gate_hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GRUNConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GRUNError(f"unknown GRUNConfig fields {unknown}; known: {sorted(names)}")
        if "layers" not in data:
            raise GRUNError("adapter config has no 'layers' entry")
        return cls(**data)
