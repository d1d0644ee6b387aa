"""patch / unpatch: install GatedLoReFT modules on the outputs of a Hugging Face model's decoder layers.

One forward pre-hook on the backbone records each forward (`grun_fast.positions.Forward`: where it starts in
the sequence, its attention mask); one forward hook per edited layer (prepended, so that hidden-state capture
and other hooks see the edited output) applies that layer's adapters in the order they were patched, at the
tokens `grun_fast.positions.select` names. `model.generate` is wrapped to record the prompt's last token
before decoding, and `model.init_continuous_batching` (behind `generate_batch`) to record, per engine step, each
packed request's last prompt token (`grun_fast.continuous_batching`). `disable_adapters` switches adapters off
for a block; `save_adapter` writes one to disk.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from grun_fast import continuous_batching
from grun_fast.adapters import adapter_metadata, load_tensors, read_adapter_for, write_adapter
from grun_fast.architectures import locate
from grun_fast.config import GRUNConfig
from grun_fast.errors import GRUNError
from grun_fast.module import GatedLoReFT
from grun_fast.positions import EditSpec, Forward, PackedStep, forward_record, input_shape, prompt_spec, select

DEFAULT_NAME = "default"
_STATE_ATTR = "_grun_state"
_MODULES_ATTR = "grun_adapters"


@dataclass
class _State:
    backbone: nn.Module
    layers: nn.ModuleList
    configs: dict[str, GRUNConfig] = field(default_factory=dict)  # in patch order; layers resolved
    handles: list = field(default_factory=list)
    layer_handles: dict[int, object] = field(default_factory=dict)
    forward: Forward | None = None
    override: EditSpec | None = None      # from edit_at
    generation: EditSpec | None = None    # the running generate call's prompt ends
    packed: PackedStep | None = None      # continuous batching: the prepared step's last prompt tokens
    disabled: frozenset = frozenset()     # adapter names switched off by disable_adapters
    own_methods: dict = field(default_factory=dict)  # instance attributes the wrapped methods had before, if any

    @property
    def spec(self) -> EditSpec | None:
        """The explicit edit positions in force: edit_at's, else the running generate call's."""
        return self.override if self.override is not None else self.generation

    def check_names(self, names: Iterable[str]) -> None:
        """GRUNError naming the first of `names` that is not patched."""
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise GRUNError(f"no adapter named {unknown[0]!r} on this model; patched: {', '.join(self.configs)}")


def patch(model: nn.Module, config_or_path: GRUNConfig | str | Path, name: str = DEFAULT_NAME) -> nn.Module:
    """Install a GRUN adapter on `model` in place and return it.

    `config_or_path` is a GRUNConfig (fresh, randomly initialised modules), a folder written by
    `save_adapter`, or a folder of the GRUN reference code's checkpoints (`intkey_*.bin`).
    Everything is validated before the model is touched. Safe inside `torch.inference_mode()`: the adapter's
    parameters are made as ordinary tensors there too.
    """
    backbone, layers = locate(model)
    hidden_size = int(model.config.hidden_size)
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(name, str) or not name or "." in name:
        raise GRUNError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if state is not None and name in state.configs:
        raise GRUNError(f"an adapter named {name!r} is already patched into this model; unpatch it or pass another name")
    tensors = None
    if isinstance(config_or_path, GRUNConfig):
        config = config_or_path
    elif isinstance(config_or_path, (str, Path)):
        config, tensors = read_adapter_for(model, config_or_path)
    else:
        raise GRUNError(f"patch() takes a GRUNConfig or an adapter folder, got {type(config_or_path).__name__}")
    resolved = config.resolve_layers(len(layers))
    if config.rank > hidden_size:
        raise GRUNError(f"rank {config.rank} exceeds the model's hidden size {hidden_size}")
    config = GRUNConfig.from_dict({**config.to_dict(), "layers": resolved})

    with torch.inference_mode(False):
        modules = nn.ModuleDict()
        for index in resolved:
            reference = next(layers[index].parameters(), None)
            device = reference.device if reference is not None else None
            modules[str(index)] = GatedLoReFT(
                hidden_size, config.rank, config.gate, config.gate_hidden, config.gate_threshold, device=device
            )
        if tensors is not None:
            load_tensors(modules, tensors)

    _guard_hooks_under_compile()
    if state is None:
        state = _State(backbone, layers)
        state.handles.append(backbone.register_forward_pre_hook(_backbone_pre_hook(state), with_kwargs=True))
        state.handles.append(backbone.register_forward_hook(_backbone_post_hook(state)))
        _wrap_generate(model, state)
        setattr(model, _STATE_ATTR, state)
        setattr(model, _MODULES_ATTR, nn.ModuleDict())
    getattr(model, _MODULES_ATTR)[name] = modules
    state.configs[name] = config
    for index in resolved:
        if index not in state.layer_handles:
            hook = _layer_hook(state, getattr(model, _MODULES_ATTR), index)
            state.layer_handles[index] = layers[index].register_forward_hook(hook, prepend=True)
    return model


def _guard_hooks_under_compile() -> None:
    """torch.compile does not guard on module hooks by default (torch._dynamo.config.skip_nnmodule_hook_guards):
    a graph compiled before `patch`, or for another model of the same class, would keep running without the
    adapters' hooks, silently. From the first patch on dynamo guards on hooks (adding or removing ours
    recompiles), and what it compiled before, without those guards, is dropped once (torch._dynamo.reset)."""
    import torch._dynamo  # loaded already by transformers' modelling code

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()


def unpatch(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove the adapter `name` (all adapters when None); the model is then exactly as before patching."""
    state = _state(model)
    names = list(state.configs) if name is None else [name]
    state.check_names(names)
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
        _restore_generate(model, state)
        delattr(model, _STATE_ATTR)
        delattr(model, _MODULES_ATTR)
    return model


def save_adapter(model: nn.Module, path: str | Path, name: str = DEFAULT_NAME,
                 prompt_format: str | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` of `model` to folder `path` (created; existing files replaced atomically);
    `prompt_format`: the prompt format it was trained with, recorded in adapter_config.json; `tensors`: the
    adapter's tensors if already gathered (`adapter_tensors`; under FSDP every process gathers, one writes)."""
    config = adapter_config(model, name)
    tensors = adapter_tensors(model, name) if tensors is None else tensors
    return write_adapter(path, adapter_metadata(model, config, prompt_format), tensors)


def adapter_tensors(model: nn.Module, name: str = DEFAULT_NAME) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes (fp32, whole). Parameters sharded by FSDP (DTensors) are gathered:
    a collective, so every process of the group must call this."""
    tensors = {}
    for index, module in adapter_modules(model, name).items():
        for key, value in module.state_dict().items():
            if hasattr(value, "full_tensor"):  # a torch.distributed DTensor shard
                value = value.full_tensor()
            tensors[f"layers.{index}.{key}"] = value.detach().float()
    return tensors


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], name: str = DEFAULT_NAME) -> None:
    """Copy tensors read by `grun_fast.adapters.read_adapter_for` into adapter `name` (resuming training)."""
    adapter_config(model, name)
    load_tensors(getattr(model, _MODULES_ATTR)[name], tensors)


def adapter_names(model: nn.Module, enabled_only: bool = False) -> list[str]:
    """Names of the adapters patched into `model`, in the order they apply (`enabled_only`: leave out those
    switched off by `disable_adapters`)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return []
    return [n for n in state.configs if not (enabled_only and n in state.disabled)]


def adapter_config(model: nn.Module, name: str = DEFAULT_NAME) -> GRUNConfig:
    """The config of adapter `name`, with layer indices made non-negative."""
    state = _state(model)
    state.check_names([name])
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


def set_gate_threshold(model: nn.Module, threshold: float | None, name: str = DEFAULT_NAME) -> None:
    """Run adapter `name` with a hard gate threshold from now on: rows whose gate is below it run the frozen
    model bit for bit (None: the soft gate, which edits everywhere). Set in its modules and in the config
    `save_adapter` writes. A soft-trained adapter deployed so loses its edits on rows the gate half opens on
    (general questions, in the forget study), and also small gated edits it may rely on."""
    config = replace(adapter_config(model, name), gate_threshold=threshold)  # range-checked
    for module in adapter_modules(model, name).values():
        module.gate_threshold = config.gate_threshold
    _state(model).configs[name] = config


@contextlib.contextmanager
def disable_adapters(model: nn.Module, names: str | Iterable[str] | None = None):
    """Run the block with adapters `names` (all when None) switched off: the model computes exactly what it
    would without them (the base model, or the other adapters only). Nothing is unpatched or copied."""
    state = _state(model)
    chosen = list(state.configs) if names is None else [names] if isinstance(names, str) else list(names)
    state.check_names(chosen)
    previous = state.disabled
    state.disabled = previous | frozenset(chosen)
    try:
        yield
    finally:
        state.disabled = previous


@contextlib.contextmanager
def edit_at(model: nn.Module, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
            cached_prefix: bool = False):
    """Edit exactly these tokens in the forwards run inside the block (teacher forcing: training, scoring).

    positions: integer tensor [B], the token to edit in each row (the last prompt token, prompt_len - 1),
    counted from the start of the sequence (>= 0). mask: bool [B, T], the tokens to edit. Give exactly one.
    `all`-mode adapters still edit every token. A forward that starts the sequence must contain the
    positions (else GRUNError); a forward that continues a KV cache edits the positions that fall inside it.
    cached_prefix: positions / mask index the tokens of each forward instead (training on answer suffixes
    after a cached, adapter-independent prompt prefix), in forwards that continue a cache too.
    """
    state = _state(model)
    if (positions is None) == (mask is None):
        raise GRUNError("edit_at needs exactly one of positions= or mask=")
    spec = (EditSpec.from_positions(positions, bool(cached_prefix)) if positions is not None
            else EditSpec.from_mask(mask, bool(cached_prefix)))
    previous = state.override
    state.override = spec
    try:
        yield
    finally:
        state.override = previous


def _state(model: nn.Module) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise GRUNError("this model has no GRUN adapter patched in; call grun_fast.patch(model, ...) first")
    return state


def _backbone_pre_hook(state: _State):
    def hook(module, args, kwargs):
        paged = continuous_batching.is_paged(kwargs)
        state.forward = forward = forward_record(kwargs, paged, state.packed if paged else None)
        shape = input_shape(args, kwargs)
        if shape is not None:  # work out (and check) every adapter's tokens before any layer runs
            spec = state.spec
            for name, config in state.configs.items():
                if name not in state.disabled:
                    select(forward, spec, config.positions, name, *shape, state.generation is not None)
        return None

    return hook


def _backbone_post_hook(state: _State):
    def hook(module, args, output):
        if torch.compiler.is_compiling():  # the record's tensors would leave the graph as outputs on every step
            state.forward = None           # (eager keeps it: gradient checkpointing reruns layers after the forward)
        return None

    return hook


# Every continuous-batching entry point (generate_batch, continuous_batching_context_manager, transformers
# serve) makes its manager through this one method.
_WRAPPED = ("generate", "init_continuous_batching")


def _wrap_generate(model: nn.Module, state: _State) -> None:
    """`model.generate` records each row's last prompt token before it decodes (the edit positions of every
    forward it runs: prefill, chunked prefill, use_cache=False steps); `init_continuous_batching` hooks the
    manager so that each engine step records its packed requests' last prompt tokens."""
    for attr in _WRAPPED:
        original = getattr(model, attr, None)
        if original is None:
            continue
        if attr in model.__dict__:
            state.own_methods[attr] = model.__dict__[attr]
        if attr == "generate":
            wrapped = _generate_wrapper(state, original, attr, model)
        else:
            wrapped = continuous_batching.wrap_init(lambda: getattr(model, _STATE_ATTR, None), original)
        setattr(model, attr, functools.wraps(original)(wrapped))


def _restore_generate(model: nn.Module, state: _State) -> None:
    for attr in _WRAPPED:
        if attr in state.own_methods:
            setattr(model, attr, state.own_methods[attr])
        else:
            model.__dict__.pop(attr, None)


def _generate_wrapper(state: _State, original, attr: str, model: nn.Module):
    def generate(*args, **kwargs):
        modes = {n: c.positions for n, c in state.configs.items() if n not in state.disabled}
        _refresh_folds(getattr(model, _MODULES_ATTR), modes, getattr(model, "dtype", torch.float32))
        spec = prompt_spec(args, kwargs)
        if state.override is None:
            masked = [n for n, mode in modes.items() if mode == "mask"]
            if masked:
                raise GRUNError(f"adapter {masked[0]!r} has positions='mask': generate gives it no tokens to edit. "
                                "Wrap the call in grun_fast.edit_at(model, mask=...) over the prompt, or use an "
                                "adapter trained with positions='last_prompt'")
        elif spec is not None and not state.override.relative and state.override.kind == "positions" \
                and state.override.high > spec.high:
            raise GRUNError(f"edit_at names token {state.override.high}, past the prompt's last token {spec.high}")
        previous = state.generation
        state.generation = spec
        try:
            return original(*args, **kwargs)
        finally:
            state.generation = previous

    return generate


def _refresh_folds(container: nn.ModuleDict, names: Iterable[str], dtype: torch.dtype) -> None:
    """Fold the enabled adapters' parameters before decoding (`GatedLoReFT.folded`): a compiled step reads the
    fold without checking it against the parameters, which it cannot do inside a graph."""
    with torch.no_grad():
        for name in names:
            for module in container[name].values():
                module.folded(dtype, module.weight.device)


def _layer_hook(state: _State, container: nn.ModuleDict, index: int):
    key = str(index)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        forward = state.forward
        if forward is None:
            raise GRUNError("a patched decoder layer ran outside its model's forward; call the model, not the layer")
        spec = state.spec
        generating = state.generation is not None
        edited = hidden
        for name, config in state.configs.items():
            adapter = container[name]
            if key not in adapter or name in state.disabled:
                continue
            selection = select(forward, spec, config.positions, name, edited.shape[0], edited.shape[1],
                               edited.device, generating)
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
        if not torch.compiler.is_compiling():  # boolean indexing has a data-dependent shape: a graph break
            adapter.last_gate = gate[value]
        return out
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    edited_rows, _ = adapter(hidden[rows, value])
    if torch.is_grad_enabled():
        return hidden.index_put((rows, value), edited_rows)
    return hidden.index_put_((rows, value), edited_rows)
