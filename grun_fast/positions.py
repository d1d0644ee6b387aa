"""Which tokens a patched adapter edits in each forward: the one place that decides.

Every forward of the backbone gets an explicit record (`Forward`): its first token's column in the whole
sequence (`start`: the length of the KV cache it continues, 0 without one), its length and its 2-D
attention mask. The tokens to edit come from the first of these that applies:

1. `edit_at(model, positions=|mask=)`, an `EditSpec` for teacher-forced forwards (training, scoring):
   columns of the whole sequence (a forward that starts the sequence indexes its own tokens), or with
   `cached_prefix=True` the tokens of each forward itself.
2. A `model.generate` call: before decoding, the patched `generate` records each row's last prompt token
   (its column; left or right padding) as an `EditSpec`. The prefill edits it, whether it runs in one
   forward or in chunks; decode steps start past it and are never edited; with `use_cache=False` every step
   re-reads the prompt and edits the same column, so the tokens equal the cached run's.
3. Otherwise a forward that starts a sequence is its own prompt: its last non-padding token per row.
   A forward that continues a KV cache is not edited.

Under transformers' continuous batching (`generate_batch`, `init_continuous_batching`) a forward packs a slice of
every scheduled request (a prefill chunk or one decode token) into one row over a paged KV cache, and neither 1-3
apply: the engine's input preparation records each request's (tokens cached, tokens in this step, prompt length)
and `packed_step` turns that into the row's columns holding a last prompt token (`grun_fast.continuous_batching`
does the recording). Each request's last prompt token is edited once, in the step that processes it (again
if the engine evicts the request and prefills it anew). `edit_at` does not reach packed requests: a GRUNError.
A packed request may name the adapters that apply to it (`grun-fast serve`'s per-request adapter stacks): an
adapter then edits only the columns of the requests that named it (`last_prompt`: their prompt ends; `all`:
every column of theirs), so requests with different stacks share one step.

`all` adapters edit every token of every forward; `mask` adapters edit only where 1 or 2 says, and raise
a `GRUNError` when neither does (they used to do nothing without a word).

Under torch.compile (and CUDA graph capture) with a static KV cache, the cache's length lives on the device: the
forward's `start` is then that 0-d tensor, never read on the host (a sync would break the graph or the capture),
and the same rules give a [B, T] mask computed on the device. generate's decode steps need not even that: once a
forward whose start was known (the prefill) has passed every prompt end, the spec is marked `processed` and later
forwards of the call edit nothing, so a compiled decode step of a `last_prompt` adapter holds no adapter op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import torch

from grun_fast.errors import GRUNError

Selection = tuple  # ("all", None) | ("index", LongTensor [B]) | ("mask", bool [B, T])


@dataclass
class EditSpec:
    """Explicit edit positions: per-row columns [B] or a bool mask [B, S]; `relative`: index each forward's
    own tokens instead of the sequence's columns. `low`/`high` bound the positions (read once, on the host).
    `processed`: a generate call's prompt ends all lie in forwards that already ran (see `_from_spec`)."""

    kind: str
    value: torch.Tensor
    relative: bool = False
    low: int = 0
    high: int = 0
    source: str = "edit_at"
    processed: bool = False

    @classmethod
    def from_positions(cls, positions: torch.Tensor, relative: bool = False, source: str = "edit_at") -> "EditSpec":
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point() \
                or positions.dtype == torch.bool:
            shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise GRUNError(f"positions must be an integer tensor of shape [batch], got {shape}"
                            f"{' ' + str(positions.dtype) if isinstance(positions, torch.Tensor) else ''}")
        if positions.numel() == 0:
            raise GRUNError("positions is empty: give one token per row")
        low, high = int(positions.min()), int(positions.max())
        if low < 0:
            raise GRUNError(f"positions must be >= 0 (token indices from the start), got {low}; negative indices "
                            "are not counted from the end")
        return cls("positions", positions.long(), relative, low, high, source)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, relative: bool = False) -> "EditSpec":
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise GRUNError(f"mask must have shape [batch, seq_len], got {shape}")
        if mask.is_floating_point():
            raise GRUNError(f"mask must be bool (or integer), got {mask.dtype}")
        return cls("mask", mask.to(torch.bool), relative)


class PackedRequest(NamedTuple):
    """One request's slice of a packed row: its columns [start, start + count), the column of its last prompt
    token if this slice holds it, and the adapters it named (None: every enabled adapter). A NamedTuple: one is
    made per request per engine step."""

    start: int
    count: int
    end: int | None
    adapters: frozenset[str] | None = None


@dataclass(frozen=True)
class PackedStep:
    """One continuous-batching forward: the columns of its packed row that hold a request's last prompt token,
    the row's length as the engine prepared it (checked against the forward, never guessed) and each request's
    slice (`routed`: some request named its adapters)."""

    ends: tuple[int, ...]
    tokens: int
    requests: tuple[PackedRequest, ...] = ()
    routed: bool = False


@dataclass
class Forward:
    """What the current forward of the backbone looks like, and the selections worked out for it. `paged`: a
    continuous-batching forward (one packed row over a paged cache), whose edits come from `packed` only. `start`
    is a 0-d device tensor where only the device knows it (`cached_length`)."""

    start: int | torch.Tensor
    attention_mask: torch.Tensor | None
    selections: dict = field(default_factory=dict)
    paged: bool = False
    packed: PackedStep | None = None


def forward_record(kwargs: dict, paged: bool = False, packed: PackedStep | None = None) -> Forward:
    """The record of one backbone forward, from its keyword arguments (before it runs); `paged` forwards carry
    the engine's `packed` record instead of a cache length and mask."""
    if paged:
        if packed is None:
            raise GRUNError("a continuous-batching forward ran without its requests' prompt ends: the manager was "
                            "made before grun_fast.patch (or without model.init_continuous_batching). Make it after "
                            "patching: model.generate_batch(...) / model.init_continuous_batching(...)")
        return Forward(start=0, attention_mask=None, paged=True, packed=packed)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        mask = None  # a pre-built 4-D mask: fall back to the sequence end
    return Forward(start=cached_length(cache), attention_mask=mask)


def input_shape(args: tuple, kwargs: dict) -> tuple[int, int, torch.device] | None:
    """(batch, length, device) of a backbone forward's input ids or embeddings, when it can be read."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        ids = kwargs.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return ids.shape[0], ids.shape[1], ids.device
    return None


def cached_length(cache) -> int | torch.Tensor:
    """How many columns the KV cache already holds (0 for none). A static cache counts on the device: inside
    torch.compile or a CUDA graph capture its 0-d tensor comes back as is, since reading it on the host would
    break the graph (or the capture)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        length = cache.get_seq_length()
        if isinstance(length, torch.Tensor) and traced(length):
            return length
        return int(length)
    if isinstance(cache, (tuple, list)):  # legacy tuple cache: ((k, v), ...)
        return 0 if len(cache) == 0 or cache[0] is None else int(cache[0][0].shape[-2])
    raise GRUNError(f"cannot tell how many tokens a KV cache of type {type(cache).__name__} holds")


def traced(tensor: torch.Tensor | None = None) -> bool:
    """Inside torch.compile's tracing, or capturing a CUDA graph on `tensor`'s device: device values must stay
    on the device and Python must not branch on them."""
    if torch.compiler.is_compiling():
        return True
    return tensor is not None and tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def select(forward: Forward, spec: EditSpec | None, mode: str, name: str, batch: int, length: int,
           device: torch.device, generating: bool) -> Selection | None:
    """The tokens adapter `name` (positions `mode`) edits in this forward of `batch` rows of `length` tokens,
    or None. Worked out once per forward (the backbone's pre-hook asks first, so errors come before any
    layer runs)."""
    if forward.paged:
        return _packed(forward, spec, mode, name, batch, length, device)
    if mode == "all":
        return ("all", None)
    key = "spec" if spec is not None else mode
    if key not in forward.selections:
        if spec is None and isinstance(forward.start, torch.Tensor):
            forward.selections[key] = _own_prompt_on_device(forward, mode, name, batch, length, device)
            return forward.selections[key]
        if spec is None and mode == "mask" and forward.start == 0:
            raise GRUNError(f"adapter {name!r} has positions='mask': it edits only where grun_fast.edit_at(model, "
                            "mask=...) or positions=... says, and this forward has neither. Wrap the call in "
                            "edit_at, or use an adapter trained with positions='last_prompt'")
        if spec is None:
            start_of_sequence = forward.start == 0 and mode != "mask"
            forward.selections[key] = _last_token(forward, batch, length, device) if start_of_sequence else None
        else:
            forward.selections[key] = _from_spec(forward, spec, batch, length, device, generating)
    return forward.selections[key]


def packed_step(slices: Iterable[tuple[int, int, int]], tokens: int,
                adapters: Sequence[frozenset[str] | None] | None = None) -> PackedStep:
    """The record of one continuous-batching forward from its requests' slices, in packing order: (tokens of
    the request already in its cache, its tokens in this forward, its prompt length). A prompt's last token is
    in the slice that covers column prompt_length - 1: the whole prefill or the chunk that ends the prompt;
    earlier chunks and decode steps hold none. `adapters`: per slice, the adapter names its request selected
    (None: every enabled adapter)."""
    slices = list(slices)
    adapters = [None] * len(slices) if adapters is None else [None if a is None else frozenset(a) for a in adapters]
    if len(adapters) != len(slices):
        raise GRUNError(f"{len(adapters)} adapter selections for {len(slices)} packed requests")
    ends, requests, offset = [], [], 0
    for (cached, count, prompt), chosen in zip(slices, adapters):
        last = prompt - 1
        end = offset + last - cached if cached <= last < cached + count else None
        if end is not None:
            ends.append(end)
        requests.append(PackedRequest(offset, count, end, chosen))
        offset += count
    if offset > tokens:
        raise GRUNError(f"continuous batching packed {offset} tokens into a {tokens}-token step")
    return PackedStep(tuple(ends), tokens, tuple(requests), any(a is not None for a in adapters))


def _packed(forward: Forward, spec: EditSpec | None, mode: str, name: str, batch: int, length: int,
            device: torch.device) -> Selection | None:
    step = forward.packed
    if batch != 1 or length != step.tokens:
        raise GRUNError(f"continuous batching prepared a [1, {step.tokens}] step but the forward has batch "
                        f"{batch}, length {length}")
    if mode != "all":
        if spec is not None and spec.source == "edit_at":
            raise GRUNError("edit_at names tokens of each row, and continuous batching packs requests into one row: "
                            "use model.generate inside edit_at")
        if mode == "mask":
            raise GRUNError(f"adapter {name!r} has positions='mask': continuous batching gives it no tokens to edit "
                            "(edit_at cannot name tokens of packed requests). Use model.generate inside edit_at, or "
                            "an adapter trained with positions='last_prompt'")
    key = ("packed", mode, name if step.routed else None)
    if key not in forward.selections:
        forward.selections[key] = _packed_columns(step, mode, name, length, device)
    return forward.selections[key]


def _packed_columns(step: PackedStep, mode: str, name: str, length: int, device: torch.device) -> Selection | None:
    """The columns adapter `name` edits in a packed step: those of the requests that selected it (every request
    when none names its adapters)."""
    chosen = [r for r in step.requests if r.adapters is None or name in r.adapters]
    if mode == "all":
        if len(chosen) == len(step.requests):
            return ("all", None)
        columns = [c for r in chosen for c in range(r.start, r.start + r.count)]
    else:
        columns = [r.end for r in chosen if r.end is not None] if step.requests else list(step.ends)
    if not columns:
        return None
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, columns] = True
    return ("mask", mask.to(device))


def _last_token(forward: Forward, batch: int, length: int, device: torch.device) -> Selection:
    mask = forward.attention_mask
    if mask is None or mask.shape[-1] != length:
        return ("index", torch.full((batch,), length - 1, dtype=torch.long, device=device))
    steps = torch.arange(length, device=mask.device)  # the last column holding a real token; any padding side
    return ("index", (mask.to(torch.long) * steps).argmax(-1).to(device))


def _own_prompt_on_device(forward: Forward, mode: str, name: str, batch: int, length: int,
                          device: torch.device) -> Selection:
    """Rule 3 for a start known only on the device: the last token, where the forward starts the sequence."""
    if mode == "mask":
        raise GRUNError(f"adapter {name!r} has positions='mask' and this forward has no edit_at: with a static KV "
                        "cache under torch.compile (or CUDA graph capture) whether it starts the sequence is known "
                        "only on the device. Wrap the call in grun_fast.edit_at(model, mask=...), or use an adapter "
                        "trained with positions='last_prompt'")
    last = _last_token(forward, batch, length, device)[1]
    steps = torch.arange(length, device=device)
    return ("mask", (steps[None, :] == last[:, None]) & (forward.start.to(device) == 0))


def _rows(value: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`value` [n, ...] for a forward of `batch` rows; generate expands each prompt to batch / n rows in a row
    (num_return_sequences, beams)."""
    n = value.shape[0]
    if n == batch:
        return value
    if batch % n == 0:
        return value.repeat_interleave(batch // n, dim=0)
    raise GRUNError(f"{what} has {n} rows but the forward has batch {batch}")


def _from_spec(forward: Forward, spec: EditSpec, batch: int, length: int, device: torch.device,
               generating: bool) -> Selection | None:
    start = 0 if spec.relative else forward.start
    what = "generate's prompt" if spec.source == "generate" else f"edit_at {spec.kind}"
    if isinstance(start, torch.Tensor):
        return _spec_on_device(spec, start, batch, length, device, what)
    if spec.source == "generate" and spec.high < start + length:
        spec.processed = True  # generate's forwards run in order: later ones start past every prompt end
    if spec.kind == "mask":
        value = _rows(spec.value, batch, what).to(device)
        if spec.relative or (forward.start == 0 and not generating):
            if value.shape[1] != length:
                raise GRUNError(f"{what} has shape {tuple(spec.value.shape)} but the forward has batch {batch}, "
                                f"length {length}")
            return ("mask", value)
        width = value.shape[1]
        if start >= width:
            return None
        local = torch.zeros(batch, length, dtype=torch.bool, device=device)
        end = min(width, start + length)
        local[:, : end - start] = value[:, start:end]
        return ("mask", local)
    if spec.high >= start + length and (spec.relative or (forward.start == 0 and not generating)):
        raise GRUNError(f"{what} names token {spec.high}, past the end of this {length}-token forward")
    if spec.high < start or spec.low >= start + length:
        return None
    local = _rows(spec.value, batch, what).to(device) - start
    if spec.low >= start and spec.high < start + length:
        return ("index", local)
    steps = torch.arange(length, device=device)  # some rows' positions lie in another chunk
    return ("mask", steps[None, :] == local[:, None])


def _spec_on_device(spec: EditSpec, start: torch.Tensor, batch: int, length: int, device: torch.device,
                    what: str) -> Selection | None:
    """`_from_spec` for a start known only on the device: a [B, T] mask of the columns the spec names, without
    the host-side bounds checks. A processed generate spec (decode steps after the prefill) edits nothing."""
    if spec.processed:
        return None
    columns = torch.arange(length, device=device) + start.to(device)
    value = _rows(spec.value, batch, what).to(device)
    if spec.kind == "mask":
        width = value.shape[1]
        inside = value.gather(1, columns.clamp(max=width - 1).expand(batch, length))
        return ("mask", inside & (columns < width))
    return ("mask", columns[None, :] == value[:, None])


def prompt_spec(args: tuple, kwargs: dict) -> EditSpec | None:
    """The last prompt token of each row of a `generate(...)` call (None when it has no prompt tensor)."""
    ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs", kwargs.get("input_ids"))
    if not isinstance(ids, torch.Tensor):
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return None
    batch, width = ids.shape[0], ids.shape[1]
    if width == 0:
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == (batch, width):
        steps = torch.arange(width, device=mask.device)
        ends = (mask.to(torch.long) * steps).argmax(-1)
    else:
        ends = torch.full((batch,), width - 1, dtype=torch.long, device=ids.device)
    return EditSpec.from_positions(ends, source="generate")
