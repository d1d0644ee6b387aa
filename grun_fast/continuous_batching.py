"""GRUN adapters under transformers' continuous batching: `generate_batch`, `init_continuous_batching`,
`continuous_batching_context_manager` and what is built on them (`transformers serve --continuous-batching`).

The engine runs the model in its own thread and packs a slice of every scheduled request (a prefill chunk, or
one decode token) into one row [1, tokens] over a paged KV cache, so a forward's arguments do not say where any
prompt ends. The engine's per-step input preparation does know: the manager's batch processor is wrapped so
that, before each forward, it records every request's (tokens already cached, tokens in this step, prompt
length); `grun_fast.positions.packed_step` turns that into the row's columns of last prompt tokens, which the
backbone's pre-hook hands to `positions.select` for the forward that follows (same thread, always next).

All entry points make their manager through `model.init_continuous_batching`, the one method wrapped here.
What cannot work raises a `GRUNError` (when the manager is made; in the engine thread, where the request's
result carries the message) instead of serving the unpatched model:
- `mask` adapters: the engine has no per-request edit positions to give them.
- `last_prompt` adapters with CUDA graphs or torch.compile: a captured step does not rerun the Python that
  picks its tokens; `all` adapters changed after such a manager was made.
- A manager made before `patch` (its steps carry no record).
Prefix sharing (`allow_block_sharing`) is switched off for managers of a patched model: the engine keys cached
blocks by token ids alone, while a block holding (or following) an edited token differs with the adapters.

Per-request adapters: `route(manager, request_id, names)` before `manager.add_request(..., request_id=...)` makes
only adapters `names` apply to that request (an empty list: the base model), in the same steps as requests with
other adapters; `release` forgets it once the request is done. Requests without a route get every enabled adapter.
Tied to transformers 5.24's engine internals (`check_engine` names what it reads).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from grun_fast.errors import GRUNError
from grun_fast.positions import packed_step

StateOf = Callable[[], Any]  # the model's patch state (grun_fast.patching._State), or None once unpatched
_MARK = "_grun_wrapped"
_ROUTES = "_grun_routes"  # request id -> the adapter names it chose (grun-fast serve's per-request stacks)


_PAGED_CLASS: list = []  # filled on first use; a plain global, which torch.compile traces (functools.cache: a warning)


def _paged_cache_class() -> type | None:
    if not _PAGED_CLASS:
        try:
            from transformers.generation.continuous_batching.cache import PagedAttentionCache
        except ImportError:
            PagedAttentionCache = None
        _PAGED_CLASS.append(PagedAttentionCache)
    return _PAGED_CLASS[0]


def is_paged(kwargs: dict) -> bool:
    """Whether a backbone forward is a continuous-batching step (its `cache` is the engine's paged cache)."""
    cache = kwargs.get("cache")
    if cache is None:
        return False
    paged = _paged_cache_class()
    return paged is not None and isinstance(cache, paged)


def check_engine() -> None:
    """GRUNError unless the installed transformers has the engine internals this module reads."""
    import transformers

    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
        from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState
    except ImportError as error:
        raise GRUNError(f"transformers {transformers.__version__} has no continuous batching engine grun_fast "
                        f"knows ({error})") from None
    fields = getattr(RequestState, "__dataclass_fields__", {})
    missing = [n for n in ("position_offset", "initial_tokens") if n not in fields]
    missing += [n for n in ("state", "query_length") if n not in getattr(FutureRequestState, "__slots__", ())]
    missing += [n for n in ("_create_batch_processor",) if not hasattr(ContinuousBatchingManager, n)]
    if missing:
        raise GRUNError(f"transformers {transformers.__version__}'s continuous batching engine lacks "
                        f"{', '.join(missing)}, which grun_fast reads to find each request's last prompt token "
                        "(written for transformers 5.24); use model.generate")


def prompt_length(request: Any) -> int:
    """A request's prompt length. A request the engine evicted and re-queued carries prompt + generated tokens
    as its `initial_tokens`, and the true prompt length in `_true_initial_tokens`."""
    return getattr(request, "_true_initial_tokens", 0) or len(request.initial_tokens)


def wrap_init(state_of: StateOf, original: Callable) -> Callable:
    """`model.init_continuous_batching`, checked before the manager is made and hooked after."""

    def init_continuous_batching(*args, **kwargs):
        state = state_of()
        if state is not None:
            masked = [n for n, c in state.configs.items() if n not in state.disabled and c.positions == "mask"]
            if masked:
                raise GRUNError(f"adapter {masked[0]!r} has positions='mask': continuous batching (generate_batch, "
                                "init_continuous_batching) gives it no tokens to edit. Use model.generate inside "
                                "grun_fast.edit_at, or an adapter trained with positions='last_prompt'")
            check_engine()
        manager = original(*args, **kwargs)
        if state_of() is not None:
            try:
                _attach(manager, state_of)
            except GRUNError:
                _restore_attention(manager)
                raise
        return manager

    return init_continuous_batching


def _editing(state: Any) -> list[str]:
    """Enabled adapters that edit chosen tokens (not every token)."""
    return [n for n, c in state.configs.items() if n not in state.disabled and c.positions != "all"]


def _signature(state: Any) -> tuple:
    """The enabled adapters (name, config object: a new one per patch): what a captured step has baked in."""
    return tuple((n, c) for n, c in state.configs.items() if n not in state.disabled)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] for x, y in zip(a, b))


def _replayed(cb_config: Any) -> str | None:
    """The engine feature that replays captured steps without running Python hooks, if any is on."""
    if any(getattr(cb_config, "cuda_graph_booleans", ()) or ()):
        return "CUDA graphs (ContinuousBatchingConfig.use_cuda_graph)"
    if getattr(cb_config, "varlen_compile_config", None) is not None or \
            getattr(cb_config, "decode_compile_config", None) is not None:
        return "torch.compile (a compile config or ContinuousBatchingConfig.default_compile_level)"
    return None


def _refusal(state: Any, cb_config: Any) -> str | None:
    editing, replayed = _editing(state), _replayed(cb_config)
    if editing and replayed:
        return (f"adapter {editing[0]!r} edits each request's last prompt token, picked per step in Python, which "
                f"steps run under {replayed} do not rerun. Pass continuous_batching_config="
                "ContinuousBatchingConfig(use_cuda_graph=False, default_compile_level=0) and no compile config")
    return None


def _attach(manager: Any, state_of: StateOf) -> None:
    """Hook a manager (new or cached on the model) so each batch processor it makes records packed steps."""
    problem = _refusal(state_of(), manager.continuous_batching_config)
    if problem:
        raise GRUNError(problem)
    if not getattr(manager, _MARK, False):
        create = manager._create_batch_processor

        def create_batch_processor():
            processor = create()
            _attach_processor(processor, state_of, getattr(manager, _ROUTES))
            return processor

        manager._create_batch_processor = create_batch_processor
        manager._grun_state_of = state_of
        setattr(manager, _ROUTES, {})
        setattr(manager, _MARK, True)
    if getattr(manager, "batch_processor", None) is not None:
        _attach_processor(manager.batch_processor, state_of, getattr(manager, _ROUTES))


def route(manager: Any, request_id: str, names: Iterable[str]) -> None:
    """Apply only adapters `names` (in patch order; none: the base model) to the manager's request `request_id`:
    call before `manager.add_request(..., request_id=request_id)`, and `release` it when the request is done."""
    routes = getattr(manager, _ROUTES, None)
    if routes is None:
        raise GRUNError("this continuous batching manager was not made by a patched model's "
                        "init_continuous_batching: it cannot choose adapters per request")
    state = manager._grun_state_of()
    chosen = frozenset(names)
    if state is None:
        raise GRUNError("the model has no GRUN adapter patched in any more")
    replayed = _replayed(manager.continuous_batching_config)
    if replayed:
        raise GRUNError(f"per-request adapters are picked per step in Python, which steps run under {replayed} do "
                        "not rerun. Make the manager with ContinuousBatchingConfig(use_cuda_graph=False, "
                        "default_compile_level=0) and no compile config")
    state.check_names(sorted(chosen))
    routes[request_id] = chosen


def release(manager: Any, request_id: str) -> None:
    """Forget the adapters chosen for a finished (or cancelled) request."""
    getattr(manager, _ROUTES, {}).pop(request_id, None)


def _route_of(routes: dict, request_id: Any) -> frozenset[str] | None:
    """The adapters a packed request chose; a forked child (`id__child#n`) follows its parent."""
    if not routes or not isinstance(request_id, str):
        return None
    chosen = routes.get(request_id)
    if chosen is None and "__child#" in request_id:
        chosen = routes.get(request_id.split("__child#")[0])
    return chosen


def _attach_processor(processor: Any, state_of: StateOf, routes: dict) -> None:
    cache = processor.cache
    cache.allow_block_sharing = False  # no cached block computed under other adapters (or none) is reused
    cache.use_prefix_sharing = False
    io = processor.inputs_and_outputs
    if getattr(io, _MARK, False):
        return
    state = state_of()
    signature = () if state is None else _signature(state)
    original = io.prepare_batch_tensors

    def prepare_batch_tensors(*args, **kwargs):
        state = state_of()
        if state is None:  # unpatched since: the engine's plain behaviour
            return original(*args, **kwargs)
        problem = _refusal(state, processor.cb_config)
        if problem is None and _replayed(processor.cb_config) and not _same(_signature(state), signature):
            problem = ("the adapters changed (patch, unpatch, disable_adapters) after this manager captured its "
                       f"steps with {_replayed(processor.cb_config)}; make a new manager")
        if problem:
            raise GRUNError(problem)
        requests = kwargs["requests_in_batch"] if "requests_in_batch" in kwargs else args[0]
        tokens = kwargs["num_q_tokens"] if "num_q_tokens" in kwargs else args[3]
        routed = bool(routes)  # read once: the server thread adds routes while this runs
        slices, chosen = [], [] if routed else None
        for request in requests:
            request_state = request.state
            slices.append((request_state.position_offset, request.query_length, prompt_length(request_state)))
            if routed:
                chosen.append(_route_of(routes, request_state.request_id))
        result = original(*args, **kwargs)  # advances each request's position_offset: read before
        state.packed = packed_step(slices, tokens, chosen)
        return result

    io.prepare_batch_tensors = prepare_batch_tensors
    setattr(io, _MARK, True)


def _restore_attention(manager: Any) -> None:
    """Undo the manager's switch to a paged attention implementation (it is made, then refused)."""
    original = getattr(manager, "_original_attn_impl", None)
    if original is not None:
        manager.model.set_attn_implementation(original)
        manager._original_attn_impl = None
