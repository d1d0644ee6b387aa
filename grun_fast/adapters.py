"""Adapters on disk: safetensors + JSON, written atomically; and an importer for GRUN reference checkpoints.

File I/O only (`grun_fast.patching.save_adapter` / `patch` call it); nothing here touches a model's adapters.

Layout of an adapter folder:
    adapter_config.json          {"format": "grun_fast.adapter", "format_version": 1, "config": {...GRUNConfig},
                                  "hidden_size", "num_layers", "model_type", "library_version",
                                  "prompt_format" (optional: the resolved prompt format it was trained with)}
    adapter_model.safetensors    "layers.<i>.rotation" [r, d] (the parameter: R is its rows orthonormalised
                                 by `grun_fast.module.orthonormalize`), "layers.<i>.weight" [r, d],
                                 "layers.<i>.bias" [r], "layers.<i>.gate.*" (the gate's Linear layers)
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from grun_fast.config import GRUNConfig
from grun_fast.errors import GRUNError
from grun_fast.version import __version__

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "grun_fast.adapter"
FORMAT_VERSION = 1


def adapter_metadata(model: nn.Module, config: GRUNConfig, prompt_format: str | None = None) -> dict:
    """The adapter_config.json contents for an adapter with `config` on `model`; `prompt_format`: the resolved
    prompt format it was trained with ("plain", "chat" or a custom format string), recorded when given."""
    extra = {} if prompt_format is None else {"prompt_format": prompt_format}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "hidden_size": int(model.config.hidden_size),
        "num_layers": _num_layers(model),
        "model_type": getattr(model.config, "model_type", None),
        "library_version": __version__,
        **extra,
    }


def write_adapter(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files through temporaries in the target folder, then rename each into place."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".grun-tmp-", dir=path))
    except OSError as error:
        raise GRUNError(f"cannot write the adapter to {path}: {error.strerror or error}") from None
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(staging / WEIGHTS_FILE, path / WEIGHTS_FILE)
        os.replace(staging / CONFIG_FILE, path / CONFIG_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter folder, or of a GRUN reference checkpoint folder, validated."""
    path = Path(path)
    if not path.is_dir():
        raise GRUNError(f"adapter folder {path} does not exist")
    if not (path / CONFIG_FILE).exists() and sorted(path.glob("intkey_*.bin")):
        return import_reference_checkpoint(path)
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / needed).is_file():
            raise GRUNError(f"adapter folder {path} has no {needed}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GRUNError(f"{path / CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GRUNError(f"{path / CONFIG_FILE} is not a grun_fast adapter config (no format={FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GRUNError(f"{path / CONFIG_FILE} has format_version {meta.get('format_version')!r}; this library reads {FORMAT_VERSION}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as error:
        raise GRUNError(f"{path / WEIGHTS_FILE} is truncated or corrupted: {error}") from None
    meta["config"] = GRUNConfig.from_dict(meta.get("config") or {})
    return meta, tensors


def read_adapter_for(model: nn.Module, path: str | Path) -> tuple[GRUNConfig, dict[str, torch.Tensor]]:
    """Read an adapter and check it fits `model` (hidden size, layer count, model type, tensor shapes)."""
    meta, tensors = read_adapter(path)
    config: GRUNConfig = meta["config"]
    hidden_size, num_layers = int(model.config.hidden_size), _num_layers(model)
    model_type = getattr(model.config, "model_type", None)
    if meta.get("hidden_size") is not None and meta["hidden_size"] != hidden_size:
        raise GRUNError(f"adapter {path} was made for hidden size {meta['hidden_size']}, this model has {hidden_size}")
    if meta.get("num_layers") is not None and meta["num_layers"] != num_layers:
        raise GRUNError(f"adapter {path} was made for a model with {meta['num_layers']} layers, this one has {num_layers}")
    if meta.get("model_type") not in (None, model_type):
        raise GRUNError(f"adapter {path} was made for model_type {meta['model_type']!r}, this model is {model_type!r}")
    resolved = config.resolve_layers(num_layers)
    expected = _expected_shapes(config, hidden_size, resolved)
    for key, shape in expected.items():
        if key not in tensors:
            raise GRUNError(f"adapter {path} lacks tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise GRUNError(f"adapter {path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise GRUNError(f"adapter {path} has unexpected tensors {extra[:5]}")
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise GRUNError(f"adapter {path}: tensor {key!r} holds NaN or infinite values")
    return config, tensors


def load_tensors(modules: nn.ModuleDict, tensors: dict[str, torch.Tensor]) -> None:
    """Copy file tensors into freshly built modules."""
    for index, module in modules.items():
        prefix = f"layers.{index}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)


def _expected_shapes(config: GRUNConfig, hidden_size: int, layers: list[int]) -> dict[str, tuple]:
    r, d = config.rank, hidden_size
    gate: dict[str, tuple] = {}
    if config.gate == "linear":
        gate = {"gate.weight": (1, d), "gate.bias": (1,)}
    else:
        widths = (d, *config.gate_hidden, 1)
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            gate[f"gate.{2 * i}.weight"] = (w_out, w_in)
            gate[f"gate.{2 * i}.bias"] = (w_out,)
    per_layer = {"rotation": (r, d), "weight": (r, d), "bias": (r,), **gate}
    return {f"layers.{i}.{k}": v for i in layers for k, v in per_layer.items()}


def _num_layers(model: nn.Module) -> int:
    from grun_fast.architectures import locate

    return len(locate(model)[1])


# --- GRUN reference code checkpoints (GRUN.md section 7) -------------------------------------------

_REFERENCE_ALIASES = {
    "rotate_layer": "rotation_t",
    "rotate_layer.weight": "rotation_t",
    "weight": "weight",
    "learned_source.weight": "weight",
    "bias": "bias",
    "learned_source.bias": "bias",
}


def import_reference_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read `intkey_*.bin` files of the GRUN reference code (pickled tensor dicts, loaded with
    weights_only=True) into this library's (metadata, tensors) form. The layer index comes from the file
    name (`...layer.<i>...` or `...layer_<i>...`); hidden size, rank and gate kind from the tensors."""
    path = Path(path)
    files = sorted(path.glob("intkey_*.bin"))
    if not files:
        raise GRUNError(f"{path} holds no intkey_*.bin reference checkpoints")
    tensors: dict[str, torch.Tensor] = {}
    layers, ranks, gates, gate_hidden = [], set(), set(), None
    for file in files:
        match = re.search(r"layer[._-]?(\d+)", file.name)
        if match is None:
            raise GRUNError(f"cannot tell the layer of reference checkpoint {file.name} (expected 'layer.<i>' in its name)")
        layer = int(match.group(1))
        try:
            raw = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise GRUNError(
                f"refusing to load {file}: it is not a plain tensor dict that torch.load(weights_only=True) accepts ({error})"
            ) from None
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise GRUNError(f"{file} is not a dict of tensors")
        entry: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            if key in _REFERENCE_ALIASES:
                entry[_REFERENCE_ALIASES[key]] = value.float()
            elif key.startswith("gate_func."):
                entry["gate." + key[len("gate_func."):]] = value.float()
        missing = [k for k in ("rotation_t", "weight", "bias") if k not in entry]
        if missing or not any(k.startswith("gate.") for k in entry):
            raise GRUNError(f"{file} lacks reference keys {missing or ['gate_func.*']}; found {sorted(raw)}")
        rotation = entry.pop("rotation_t").T.contiguous()
        ranks.add(rotation.shape[0])
        if "gate.weight" in entry:
            gates.add("linear")
        else:
            gates.add("mlp")
            gate_hidden = tuple(entry[f"gate.{2 * i}.weight"].shape[0] for i in range(len([k for k in entry if k.endswith(".weight") and k.startswith("gate.")]) - 1))
        for key, value in {"rotation": rotation, **entry}.items():
            tensors[f"layers.{layer}.{key}"] = value
        layers.append(layer)
    if len(ranks) != 1 or len(gates) != 1:
        raise GRUNError(f"reference checkpoints in {path} mix ranks {sorted(ranks)} or gates {sorted(gates)}")
    config = GRUNConfig(layers=sorted(layers), rank=ranks.pop(), gate=gates.pop(), positions="last_prompt",
                        **({"gate_hidden": gate_hidden} if gate_hidden else {}))
    hidden_size = next(iter(tensors.values())).shape[-1]
    return {"format": FORMAT, "config": config, "hidden_size": hidden_size, "num_layers": None, "model_type": None}, tensors
