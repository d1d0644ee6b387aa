"""Where each supported Hugging Face architecture keeps its decoder layers: the one table to extend.

`backbone` is the attribute of the causal LM holding the decoder stack (the module whose forward gets
`attention_mask` and the KV cache); `layers` the attribute of the backbone holding the ModuleList.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from grun_fast.errors import GRUNError


@dataclass(frozen=True)
class Architecture:
    backbone: str
    layers: str


_LLAMA_LIKE = Architecture("model", "layers")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": Architecture("transformer", "h"),
    "gpt_neox": Architecture("gpt_neox", "layers"),
}


def locate(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The backbone module and its decoder layers for a causal LM (or a bare backbone)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise GRUNError(
            f"unsupported model_type {model_type!r}; grun_fast supports: {', '.join(sorted(ARCHITECTURES))} "
            "(add a row to grun_fast.architectures.ARCHITECTURES for another decoder-only model)"
        )
    backbone = getattr(model, arch.backbone, None)
    if backbone is None and isinstance(getattr(model, arch.layers, None), nn.ModuleList):
        backbone = model  # a bare backbone, e.g. LlamaModel
    layers = getattr(backbone, arch.layers, None)
    if not isinstance(layers, nn.ModuleList):
        raise GRUNError(f"could not find the decoder layers of this {model_type} model at {arch.backbone}.{arch.layers}")
    return backbone, layers


def cache_kwarg(module: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (before)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = output.get("cache", None)
    return cache if cache is not None else output.get("past_key_values", None)
