"""patch / unpatch: install GatedLoReFT modules on the outputs of a Hugging Face model's decoder layers.

One forward pre-hook on the backbone records, per forward, whether it is a prefill (empty KV cache) and
the attention mask; one forward hook per edited layer (prepended, so that hidden-state capture and
other hooks see the edited output) applies that layer's adapters in the order they were patched.

Which tokens get edited:
- `last_prompt`: inside `edit_at(model, positions=...)` the given token per row; otherwise, in a prefill
  forward, the last non-padding token of each row (from the attention mask, on device); decode steps
  are left alone.
- `all`: every token of every forward, decode steps included.
- `mask`: only inside `edit_at(model, mask=...)` (or `positions=`), on full forwards.
`edit_at` applies only to forwards that start with an empty KV cache (decode steps are never affected),
unless given ``cached_prefix=True``: then it also applies to forwards that continue a KV cache (training on
answer suffixes after a cached, adapter-independent prompt prefix; the positions index the new tokens).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from grun_fast.architectures import locate
from grun_fast.config import GRUNConfig
from grun_fast.errors import GRUNError
from grun_fast.module import GatedLoReFT

DEFAULT_NAME = "default"
_STATE_ATTR = "_grun_state"
_MODULES_ATTR = "grun_adapters"


@dataclass
class _Forward:
    """What the current forward of the backbone looks like."""

    prefill: bool
    attention_mask: torch.Tensor | None
    last_index: torch.Tensor | None = None  # last non-padding token per row, computed on first use


@dataclass
class _State:
    backbone: nn.Module
    layers: nn.ModuleList
    configs: dict[str, GRUNConfig] = field(default_factory=dict)  # in patch order; layers resolved
    handles: list = field(default_factory=list)
    layer_handles: dict[int, object] = field(default_factory=dict)
    forward: _Forward | None = None
    override: tuple[str, torch.Tensor] | None = None  # ("positions", [B]) or ("mask", [B, T]) from edit_at
    override_cached: bool = False  # edit_at(cached_prefix=True): the override also applies after a KV cache


def patch(model: nn.Module, config_or_path: GRUNConfig | str | Path, name: str = DEFAULT_NAME) -> nn.Module:
    """Install a GRUN adapter on `model` in place and return it.

    `config_or_path` is a GRUNConfig (fresh, randomly initialised modules), a folder written by
    `save_adapter`, or a folder of the GRUN reference code's checkpoints (`intkey_*.bin`).
    Everything is validated before the model is touched.
    """
    backbone, layers = locate(model)
    hidden_size = int(model.config.hidden_size)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and name in state.configs:
        raise GRUNError(f"an adapter named {name!r} is already patched into this model; unpatch it or pass another name")
    tensors = None
    if isinstance(config_or_path, GRUNConfig):
        config = config_or_path
    elif isinstance(config_or_path, (str, Path)):
        from grun_fast.adapters import read_adapter_for

        config, tensors = read_adapter_for(model, config_or_path)
    else:
        raise GRUNError(f"patch() takes a GRUNConfig or an adapter folder, got {type(config_or_path).__name__}")
    resolved = config.resolve_layers(len(layers))
    if config.rank > hidden_size:
        raise GRUNError(f"rank {config.rank} exceeds the model's hidden size {hidden_size}")
    config = GRUNConfig.from_dict({**config.to_dict(), "layers": resolved})

    modules = nn.ModuleDict()
    for index in resolved:
        reference = next(layers[index].parameters(), None)
        device = reference.device if reference is not None else None
        modules[str(index)] = GatedLoReFT(
            hidden_size, config.rank, config.gate, config.gate_hidden, config.gate_threshold, device=device
        )
    if tensors is not None:
        from grun_fast.adapters import load_tensors

        load_tensors(modules, tensors)

    if state is None:
        state = _State(backbone, layers)
        state.handles.append(backbone.register_forward_pre_hook(_backbone_pre_hook(state), with_kwargs=True))
        setattr(model, _STATE_ATTR, state)
        setattr(model, _MODULES_ATTR, nn.ModuleDict())
    getattr(model, _MODULES_ATTR)[name] = modules
    state.configs[name] = config
    for index in resolved:
        if index not in state.layer_handles:
            hook = _layer_hook(state, getattr(model, _MODULES_ATTR), index)
            state.layer_handles[index] = layers[index].register_forward_hook(hook, prepend=True)
    return model


def unpatch(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove the adapter `name` (all adapters when None); the model is then exactly as before patching."""
    state = _state(model)
    names = list(state.configs) if name is None else [name]
    for item in names:
        if item not in state.configs:
            raise GRUNError(f"no adapter named {item!r} on this model; patched: {', '.join(state.configs)}")
    container = getattr(model, _MODULES_ATTR)
    for item in names:
        del state.configs[item]
        del container[item]
    still_used = {i for config in state.configs.values() for i in config.layers}
    for index in list(state.layer_handles):
        if index not in still_used:
            state.layer_handles.pop(index).remove()
    if not state.configs:
        for handle in state.handles:
            handle.remove()
        delattr(model, _STATE_ATTR)
        delattr(model, _MODULES_ATTR)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters patched into `model`, in the order they apply."""
    state = getattr(model, _STATE_ATTR, None)
    return [] if state is None else list(state.configs)


def adapter_config(model: nn.Module, name: str = DEFAULT_NAME) -> GRUNConfig:
    """The config of adapter `name`, with layer indices made non-negative."""
    state = _state(model)
    if name not in state.configs:
        raise GRUNError(f"no adapter named {name!r} on this model; patched: {', '.join(state.configs)}")
    return state.configs[name]


def adapter_modules(model: nn.Module, name: str = DEFAULT_NAME) -> dict[int, GatedLoReFT]:
    """Layer index -> GatedLoReFT of adapter `name`."""
    adapter_config(model, name)
    return {int(k): m for k, m in getattr(model, _MODULES_ATTR)[name].items()}


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    """The trainable parameters of adapter `name` (of every adapter when None)."""
    for item in adapter_names(model) if name is None else [name]:
        for module in adapter_modules(model, item).values():
            yield from module.parameters()


@contextlib.contextmanager
def edit_at(model: nn.Module, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
            cached_prefix: bool = False):
    """Edit exactly these tokens in the forwards run inside the block (teacher forcing: training, scoring).

    positions: LongTensor [B], the token to edit in each row (the last prompt token, prompt_len - 1).
    mask: bool [B, T], the tokens to edit. Give exactly one. `all`-mode adapters still edit every token.
    cached_prefix: also edit in forwards that continue a non-empty KV cache (positions / mask then index the
    tokens of that forward, not of the whole sequence); by default such forwards are never edited.
    """
    state = _state(model)
    if (positions is None) == (mask is None):
        raise GRUNError("edit_at needs exactly one of positions= or mask=")
    if positions is not None:
        if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
            raise GRUNError(f"positions must be an integer tensor of shape [batch], got {tuple(positions.shape)} {positions.dtype}")
        override = ("positions", positions.long())
    else:
        if mask.dim() != 2:
            raise GRUNError(f"mask must have shape [batch, seq_len], got {tuple(mask.shape)}")
        override = ("mask", mask.to(torch.bool))
    previous = state.override, state.override_cached
    state.override, state.override_cached = override, bool(cached_prefix)
    try:
        yield
    finally:
        state.override, state.override_cached = previous


def _state(model: nn.Module) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise GRUNError("this model has no GRUN adapter patched in; call grun_fast.patch(model, ...) first")
    return state


def _cache_is_empty(cache) -> bool:
    if cache is None:
        return True
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length() == 0
    if isinstance(cache, (tuple, list)):  # legacy tuple cache: ((k, v), ...)
        return len(cache) == 0 or cache[0] is None or cache[0][0].shape[-2] == 0
    return False


def _backbone_pre_hook(state: _State):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # a pre-built 4D mask: fall back to the sequence end
        state.forward = _Forward(prefill=_cache_is_empty(cache), attention_mask=mask)
        return None

    return hook


def _selection(state: _State, positions_mode: str, hidden: torch.Tensor):
    """("all", None) | ("index", LongTensor[B]) | ("mask", bool[B, T]) | None (no edit) for one adapter."""
    if positions_mode == "all":
        return ("all", None)
    forward = state.forward
    if forward is None or not (forward.prefill or (state.override is not None and state.override_cached)):
        return None
    batch, seq_len = hidden.shape[0], hidden.shape[1]
    if state.override is not None:
        kind, value = state.override
        if value.shape[0] != batch or (kind == "mask" and value.shape[1] != seq_len):
            raise GRUNError(
                f"edit_at {kind} has shape {tuple(value.shape)} but the forward has batch {batch}, length {seq_len}"
            )
        return ("index", value.to(hidden.device)) if kind == "positions" else ("mask", value.to(hidden.device))
    if positions_mode == "mask":
        return None
    if forward.last_index is None:
        mask = forward.attention_mask
        if mask is None or mask.shape[-1] != seq_len:
            forward.last_index = torch.full((batch,), seq_len - 1, dtype=torch.long, device=hidden.device)
        else:  # the last position holding a real token; correct for left and right padding
            steps = torch.arange(seq_len, device=mask.device)
            forward.last_index = (mask.to(torch.long) * steps).argmax(-1).to(hidden.device)
    return ("index", forward.last_index)


def _layer_hook(state: _State, container: nn.ModuleDict, index: int):
    key = str(index)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden
        for name, config in state.configs.items():
            adapter = container[name]
            if key not in adapter:
                continue
            selection = _selection(state, config.positions, edited)
            if selection is not None:
                edited = _apply(adapter[key], edited, selection)
        if edited is hidden:
            return None
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def _apply(adapter: GatedLoReFT, hidden: torch.Tensor, selection) -> torch.Tensor:
    kind, value = selection
    if kind == "all":
        return adapter(hidden)[0]
    if kind == "mask":
        out, gate = adapter(hidden, rows=value)
        adapter.last_gate = gate[value]
        return out
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    edited_rows, _ = adapter(hidden[rows, value])
    if torch.is_grad_enabled():
        return hidden.index_put((rows, value), edited_rows)
    return hidden.index_put_((rows, value), edited_rows)
