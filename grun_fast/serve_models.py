"""What `grun-fast serve` names and routes: model ids (one per adapter stack), and the pieces of transformers'
serving stack (transformers/cli/serving) specialised to serve one loaded, patched model.

Model ids: `base` (no adapter), `base+NAME` and `base+NAME1+NAME2...` (names in the order the adapters were
loaded, which is the order they apply). Every id is listed in `/v1/models` with its adapters' names and layers; a
request without `model` gets every adapter. All ids are served by one model in one continuous batch: each
request's engine id is routed to its stack (`grun_fast.continuous_batching.route`), and each adapter edits only
the requests that chose it. Without continuous batching the requests run one at a time in one thread, each
inside `disable_adapters` for the adapters it left out.

Transformers' classes are reused as they are; the subclasses here change what a model id means (the stack, not
a checkpoint to load), keep the one model loaded (`/reset` and idle timeouts do not unload it), and turn
malformed requests into 4xx answers (a bad number or an over-long prompt would otherwise be a 500, and a request
larger than the whole KV cache would stop the engine for everyone).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import HTTPException
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager, TimedModel
from transformers.cli.serving.utils import CBGenerateManager, GenerateManager, GenerationState

from grun_fast import continuous_batching
from grun_fast.errors import GRUNError
from grun_fast.patching import adapter_config, disable_adapters

BASE = "base"
SEPARATOR = "+"
MAX_ADAPTERS = 8  # 2**8 ids in /v1/models
_NUMBERS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_LENGTHS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter loaded into the served model: its name in model ids and where it came from."""

    name: str
    path: str


def check_adapter_name(name: str) -> str:
    """GRUNError unless `name` can be part of a model id (letters, digits, '-', '_'; not `base`)."""
    if not name or not all(c.isalnum() or c in "-_" for c in name) or not name.isascii():
        raise GRUNError(f"adapter name {name!r} must be letters, digits, '-' or '_' (it becomes part of the model id "
                        f"base{SEPARATOR}{name or 'NAME'}); name it with --adapter NAME=DIR")
    if name == BASE:
        raise GRUNError(f"adapter name {BASE!r} is the id of the model without adapters; name it with --adapter NAME=DIR")
    return name


@dataclass
class Stacks:
    """The model ids of a served model: every subset of its adapters, in load order."""

    model_name: str
    adapters: list[ServedAdapter]
    ids: dict[str, tuple[str, ...]] = field(init=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise GRUNError(f"two adapters are named {next(n for n in names if names.count(n) > 1)!r}; name them "
                            "with --adapter NAME=DIR")
        if len(names) > MAX_ADAPTERS:
            raise GRUNError(f"{len(names)} adapters: at most {MAX_ADAPTERS} can be served at once ({2 ** MAX_ADAPTERS} "
                            "model ids)")
        self.ids = {}
        for size in range(len(names) + 1):
            for chosen in itertools.combinations(names, size):
                self.ids[SEPARATOR.join((BASE, *chosen))] = chosen

    @property
    def default(self) -> str:
        """The id a request without `model` gets: every adapter."""
        return next(reversed(self.ids))

    def resolve(self, model_id: Any) -> str:
        """The canonical id a request names; 404 for an id this server does not serve."""
        if model_id is None:
            return self.default
        if isinstance(model_id, str) and model_id in self.ids:
            return model_id
        hint = ""
        if isinstance(model_id, str) and model_id.startswith(BASE + SEPARATOR):
            parts = model_id.split(SEPARATOR)[1:]
            known = [a.name for a in self.adapters]
            unknown = [p for p in parts if p not in known]
            if unknown:
                hint = f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(known) or 'none'}). "
            elif len(set(parts)) == len(parts):
                hint = f"adapters apply in the order they were loaded: write {SEPARATOR.join([BASE, *sorted(parts, key=known.index)])}. "
        raise HTTPException(status_code=404, detail=f"model {model_id!r} is not served here: {hint}"
                                                    f"served ids: {', '.join(self.ids)}")

    def entries(self, model: Any) -> list[dict]:
        """/v1/models entries: OpenAI's fields plus the adapters each id applies (name, layers, positions)."""
        described = {}
        for adapter in self.adapters:
            config = adapter_config(model, adapter.name)
            described[adapter.name] = {"name": adapter.name, "layers": list(config.layers),
                                       "positions": config.positions, "rank": config.rank, "gate": config.gate,
                                       "path": adapter.path}
        return [{"id": model_id, "object": "model", "created": 0, "owned_by": "grun_fast", "root": self.model_name,
                 "adapters": [described[n] for n in names], "status": {"value": "loaded"}}
                for model_id, names in self.ids.items()]


class ServedModels(ModelManager):
    """transformers' ModelManager holding one already-loaded (patched) model under every id of `stacks`."""

    def __init__(self, model: Any, processor: Any, stacks: Stacks, continuous_batching: bool = True) -> None:
        super().__init__(device=str(model.device), dtype="auto", continuous_batching=continuous_batching,
                         model_timeout=-1)
        self.stacks = stacks
        self.model, self.processor = model, processor
        self.loaded_models[stacks.model_name] = TimedModel(model, timeout_seconds=-1, processor=processor)

    @staticmethod
    def process_model_name(model_id: str) -> str:
        return model_id

    def load_model_and_processor(self, model_id_and_revision: str, progress_callback: Callable | None = None,
                                 tqdm_class: type | None = None, gguf_file: str | None = None) -> tuple[Any, Any]:
        self.stacks.resolve(model_id_and_revision)
        if progress_callback is not None:
            progress_callback({"status": "ready", "model": model_id_and_revision, "cached": True})
        return self.model, self.processor

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        return self.stacks.entries(self.model)

    def shutdown(self) -> None:
        """Nothing to unload: the served model lives as long as the server (`/reset` keeps it)."""


@dataclass
class Limits:
    """Token budget of one request: the model's positions, and what the engine's KV cache can hold."""

    max_positions: int | None
    cache_tokens: int | None = None

    @property
    def tokens(self) -> int | None:
        known = [n for n in (self.max_positions, self.cache_tokens) if n]
        return min(known) if known else None

    def apply(self, prompt_length: int, config: Any) -> None:
        """400 for an empty prompt or one (plus the tokens asked for) past the budget; a request that did not ask
        for a length gets what is left (transformers' default of 1024 would not fit a small model)."""
        if prompt_length < 1:
            raise HTTPException(status_code=400, detail="the prompt is empty (0 tokens)")
        limit = self.tokens
        if limit is None:
            return
        asked = getattr(config, "grun_asked_length", True)
        if prompt_length >= limit:
            raise HTTPException(status_code=400, detail=f"the prompt has {prompt_length} tokens; this server's limit "
                                                        f"is {limit} tokens for prompt and completion together")
        if not asked:
            config.max_new_tokens = min(config.max_new_tokens or limit, limit - prompt_length)
        elif prompt_length + config.max_new_tokens > limit:
            raise HTTPException(status_code=400, detail=f"{prompt_length} prompt tokens + max_tokens "
                                                        f"{config.max_new_tokens} exceed this server's limit of {limit} "
                                                        "tokens for prompt and completion together")


def _prompt_length(inputs: dict) -> int:
    ids = inputs["input_ids"]
    return len(ids) if isinstance(ids, list) else int(ids.shape[-1])


class RoutedBatching(CBGenerateManager):
    """One adapter stack's view of the shared continuous-batching manager: its requests are routed to the stack
    (`routed`: the model has adapters; a model served without any is transformers' plain path)."""

    _counter = itertools.count()

    def __init__(self, shared: CBGenerateManager, names: tuple[str, ...], limits: Limits, routed: bool = True) -> None:
        self.shared, self.names, self.limits, self.routed = shared, names, limits, routed

    def _route(self, engine_id: str) -> None:
        if self.routed:
            continuous_batching.route(self._cb, engine_id, self.names)

    def _release(self, engine_id: str) -> None:
        if self.routed:
            continuous_batching.release(self._cb, engine_id)

    @property
    def _cb(self) -> Any:
        return self.shared._cb

    def init_cb(self, model: Any, gen_config: Any) -> None:
        self.shared.init_cb(model, gen_config)

    def _engine_id(self, request_id: str) -> str:
        # unique even when clients reuse an X-Request-ID: the engine and its routes are keyed by it
        return f"{request_id}#{next(self._counter)}"

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        self.limits.apply(_prompt_length(inputs), gen_config)
        engine_id = self._engine_id(request_id)
        self._route(engine_id)
        try:
            queue, streamer = self.shared.generate_streaming(model, processor, inputs, gen_config, engine_id,
                                                             response_parser)
        except BaseException:
            self._release(engine_id)
            raise
        end, cancel = streamer.end, streamer.cancel

        def finished() -> None:
            self._release(engine_id)
            end()

        def cancelled() -> None:  # the client went away: the engine frees the request's slot and cache
            self._release(engine_id)
            cancel()

        streamer.end, streamer.cancel = finished, cancelled
        return queue, streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        self.limits.apply(_prompt_length(inputs), gen_config)
        engine_id = self._engine_id(request_id)
        self._route(engine_id)
        try:
            return await self.shared.generate_non_streaming(model, processor, inputs, gen_config, engine_id)
        except BaseException:  # a client gone before the end: cancel, so the slot is freed
            self._cb.cancel_request(engine_id)
            raise
        finally:
            self._release(engine_id)

    def stop(self) -> None:
        self.shared.stop()


class SwitchedGenerate(GenerateManager):
    """One adapter stack's view of the shared sequential manager (one inference thread for every stack): each
    generate call runs with the stack's left-out adapters switched off."""

    def __init__(self, shared: GenerateManager, model: Any, off: list[str], limits: Limits) -> None:
        self._thread, self.model, self.off, self.limits = shared._thread, model, off, limits

    def _switched(self, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with disable_adapters(self.model, self.off) if self.off else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return run

    def submit(self, fn, *args, **kwargs):
        return self._thread.submit(self._switched(fn), *args, **kwargs)

    def async_submit(self, fn, *args, **kwargs):
        return self._thread.async_submit(self._switched(fn), *args, **kwargs)

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        self.limits.apply(_prompt_length(inputs), gen_config)
        return super().generate_streaming(model, processor, inputs, gen_config, request_id, response_parser)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        self.limits.apply(_prompt_length(inputs), gen_config)
        return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)


class StackGeneration(GenerationState):
    """transformers' GenerationState with one engine (or one sequential thread) shared by every model id, and a
    per-id view that applies that id's adapters."""

    def __init__(self, model: Any, stacks: Stacks, limits: Limits, continuous_batching: bool = True,
                 cb_config: Any = None) -> None:
        super().__init__(continuous_batching=continuous_batching, cb_config=cb_config)
        self.model, self.stacks, self.limits = model, stacks, limits
        self._cb_manager = CBGenerateManager(cb_config=cb_config) if continuous_batching else None
        self._sequential = None if continuous_batching else GenerateManager()
        self._views: dict[str, Any] = {}

    def get_manager(self, model_id: str, use_cb: bool = False) -> Any:
        if model_id not in self._views:
            names = self.stacks.ids[model_id]
            if use_cb:
                self._views[model_id] = RoutedBatching(self._cb_manager, names, self.limits, bool(self.stacks.adapters))
            else:
                if self._sequential is None:
                    self._sequential = GenerateManager()
                off = [a.name for a in self.stacks.adapters if a.name not in names]
                self._views[model_id] = SwitchedGenerate(self._sequential, self.model, off, self.limits)
        return self._views[model_id]

    @property
    def engine(self) -> Any:
        """The running continuous-batching manager (None before `init_cb` or without continuous batching)."""
        return None if self._cb_manager is None else self._cb_manager._cb


class CheckedRequests:
    """Mixin for transformers' handlers: the model id names an adapter stack, and malformed fields are a 400
    (transformers turns a non-numeric temperature or a message without role into a 500)."""

    model_manager: ServedModels

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        for key in _NUMBERS:
            if body.get(key) is not None and (isinstance(body[key], bool) or not isinstance(body[key], (int, float))):
                raise HTTPException(status_code=400, detail=f"{key} must be a number, got {body[key]!r}")
        for key in _LENGTHS:
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise HTTPException(status_code=400, detail=f"{key} must be an integer >= 1, got {value!r}")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise HTTPException(status_code=400, detail=f"stream must be true or false, got {body['stream']!r}")

    def _resolve_model(self, body: dict) -> tuple[str, Any, Any]:
        model_id = self.model_manager.stacks.resolve(body.get("model"))
        body["model"] = model_id
        return model_id, self.model_manager.model, self.model_manager.processor

    def _build_generation_config(self, body: dict, model_generation_config: Any, use_cb: bool = False) -> Any:
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        config.grun_asked_length = any(body.get(key) is not None for key in _LENGTHS)
        return config


class Completions(CheckedRequests, CompletionHandler):
    """/v1/completions: a raw text prompt."""


class ChatCompletions(CheckedRequests, ChatCompletionHandler):
    """/v1/chat/completions: messages rendered with the tokenizer's chat template."""

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(status_code=400, detail="messages must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content", ""), (str, list, type(None))):
                raise HTTPException(status_code=400, detail=f"messages[{i}] must be an object with a string role "
                                                            "and a string (or list of parts) content")
            if isinstance(message.get("content"), list) and not all(
                    isinstance(p, dict) and isinstance(p.get("type"), str) for p in message["content"]):
                raise HTTPException(status_code=400, detail=f"messages[{i}].content parts must be objects with a type")
        tokenizer = getattr(self.model_manager.processor, "tokenizer", self.model_manager.processor)
        if getattr(tokenizer, "chat_template", None) is None:
            raise HTTPException(status_code=400, detail="this model's tokenizer has no chat template: use "
                                                        "/v1/completions with a prompt")
