"""serve a model with GRUN adapters over an OpenAI-compatible HTTP API (transformers' serving stack)

    grun-fast serve --model M --adapter [NAME=]DIR [--adapter ...] [--host 127.0.0.1] [--port 8000]

transformers' own server (`transformers serve`: FastAPI + uvicorn, its handlers, model manager and app) runs
with the model loaded and patched here instead of one it loads itself: `/v1/completions`,
`/v1/chat/completions` (streaming or not), `/v1/models`, `/health`. Continuous batching is on by default. The
`model` field of a request picks the adapters: `base`, `base+NAME`, `base+NAME1+NAME2` (see
`grun_fast.serve_models`); all ids are served by the one model in the same continuous batch.

Everything that can be checked before loading the model is (serving packages, adapter folders and names,
adapters against the model's config, the port), so a mistake is one `grun-fast serve: error: ...` line.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grun_fast.errors import GRUNError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineSettings:
    """The continuous-batching engine's size. Sized explicitly: left to transformers it sizes the KV cache from
    free memory, which on a CPU takes tens of seconds. CUDA graphs and compiled steps stay off: they replay
    steps without the Python that picks each request's edited tokens."""

    cache_tokens: int = 16384
    max_batch_tokens: int = 256
    page_size: int = 32
    max_requests_per_batch: int | None = None

    def config(self) -> Any:
        from transformers import ContinuousBatchingConfig

        return ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=max(1, self.cache_tokens // self.page_size),
            max_batch_tokens=self.max_batch_tokens, max_requests_per_batch=self.max_requests_per_batch,
            allow_block_sharing=False, use_cuda_graph=False, default_compile_level=0)


@dataclass
class Served:
    """A built server: the FastAPI app and the transformers pieces behind it."""

    app: Any
    models: Any
    generation: Any
    limits: Any
    continuous_batching: bool = True
    handlers: dict = field(default_factory=dict)

    def start_engine(self, sample: bool = False, timeout: float = 120.0) -> None:
        """Make and start the continuous-batching manager now, so a refused configuration is an error at start
        and the first request does not pay for the cache. Greedy unless `sample`: the engine takes one
        sampling setting for every request (transformers' continuous batching)."""
        if not self.continuous_batching:
            return
        model, tokenizer = self.models.model, self.models.processor
        config = copy.deepcopy(model.generation_config)
        if not sample:
            config.do_sample = False
            for key in ("temperature", "top_p", "top_k"):
                setattr(config, key, None)
        if config.eos_token_id is None:
            config.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        config.use_cache = False
        self.generation._cb_manager.init_cb(model, config)
        engine = self.generation.engine
        deadline = time.monotonic() + timeout
        while engine.batch_processor is None and engine.background_thread_status.fatal_error is None:
            if time.monotonic() > deadline:
                raise GRUNError(f"the continuous batching engine did not start within {timeout:.0f} s")
            time.sleep(0.01)
        error = engine.background_thread_status.fatal_error
        if error is not None:
            raise GRUNError(f"the continuous batching engine failed to start: {error}")
        processor = engine.batch_processor
        self.limits.cache_tokens = int(processor.cache.num_blocks * engine.continuous_batching_config.page_size)

    def stop(self) -> None:
        """Stop the engine's thread (it is not a daemon: a process would not exit while it runs), failing the
        requests still in it: transformers' own stop would first finish them all."""
        engine = self.generation.engine
        if engine is not None and engine.is_running():
            engine.stop(block=True, timeout=60, hard_stop=True)
        if engine is not None and not engine.is_running():
            self.generation._cb_manager = None  # stopped; transformers' shutdown would stop it again, with warnings
        self.generation.shutdown()
        gc.collect()  # the engine's batch processor, while torch is still whole (its __del__ calls into torch)


SERVING_TRANSFORMERS = ("5.24", "5.25")  # serve_models.py subclasses this range's transformers.cli.serving


def require_serving() -> None:
    """GRUNError unless transformers' serving packages are installed, in a version whose serving classes
    `grun_fast.serve_models` builds on (5.25 rewrote transformers.cli.serving)."""
    import transformers
    from packaging.version import Version
    from transformers.utils.import_utils import is_serve_available

    low, high = SERVING_TRANSFORMERS
    if not Version(low) <= Version(transformers.__version__) < Version(high):
        raise GRUNError(f"grun-fast serve is built on the serving classes of transformers >={low},<{high}; "
                        f"transformers {transformers.__version__} is installed: pip install "
                        f"'transformers[serving]>={low},<{high}' (or pip install -e '.[serve]' in a grun_fast "
                        "checkout); the rest of grun_fast works with it")
    if not is_serve_available():
        raise GRUNError("grun-fast serve needs transformers' serving packages (fastapi, uvicorn, openai, pydantic): "
                        "pip install 'transformers[serving]' (or pip install -e '.[serve]' in a grun_fast checkout)")


def parse_adapter(spec: str) -> tuple[str, str]:
    """`NAME=DIR` or `DIR` (named after the folder) -> (name, folder), both checked."""
    from grun_fast.serve_models import check_adapter_name

    name, sep, folder = spec.partition("=")
    if not sep:
        name, folder = Path(spec.rstrip("/\\")).name, spec
    if not Path(folder).is_dir():
        raise GRUNError(f"adapter folder not found: {folder}")
    return check_adapter_name(name), folder


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), bound before the model loads so a taken port fails fast."""
    if not 0 <= port <= 65535:
        raise GRUNError(f"--port must be 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise GRUNError(f"cannot resolve --host {host!r}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise GRUNError(f"cannot listen on {host}:{port}: {error.strerror or error} (is another server using the "
                        "port? pick another with --port, or --port 0 for any free port)") from None
    sock.listen(2048)  # connections made before uvicorn runs wait in the backlog instead of being refused
    return sock


def build(model: Any, tokenizer: Any, adapters: list[tuple[str, str]], model_name: str,
          continuous_batching: bool = True, engine: EngineSettings | None = None, verbose: bool = False) -> Served:
    """The FastAPI app of transformers' server around `model`, already patched with `adapters` ((name, folder)
    pairs, in patch order)."""
    require_serving()
    from transformers.cli.serving.server import build_server

    from grun_fast.serve_models import (ChatCompletions, Completions, Limits, ServedAdapter, ServedModels,
                                        StackGeneration, Stacks)

    from transformers.utils import logging as hf_logging

    # transformers' handlers log every request as a warning; keep that for --log-level info/debug
    hf_logging.get_logger("transformers.cli.serving").setLevel(hf_logging.INFO if verbose else hf_logging.ERROR)
    stacks = Stacks(model_name, [ServedAdapter(name, str(folder)) for name, folder in adapters])
    limits = Limits(getattr(model.config.get_text_config(), "max_position_embeddings", None))
    models = ServedModels(model, tokenizer, stacks, continuous_batching)
    cb_config = (engine or EngineSettings()).config() if continuous_batching else None
    generation = StackGeneration(model, stacks, limits, continuous_batching, cb_config)
    handlers = {"chat": ChatCompletions(models, generation), "completion": Completions(models, generation)}
    unused = _Unserved()
    app = build_server(models, handlers["chat"], completion_handler=handlers["completion"], response_handler=unused,
                       transcription_handler=unused, systemone_handler=unused, generation_state=generation)
    return Served(app, models, generation, limits, continuous_batching, handlers)


class _Unserved:
    """The endpoints of transformers' server this one does not offer (responses, transcriptions, systemone)."""

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        from fastapi import HTTPException

        raise HTTPException(status_code=404, detail="grun-fast serve offers /v1/completions, /v1/chat/completions, "
                                                    "/v1/models and /health")


class _Stopped(Exception):
    """SIGTERM arrived."""


def _stopped(signum: int, frame: Any) -> None:
    raise _Stopped()


class Server:
    """A built server on a bound socket, run by uvicorn in a background thread (tests, benchmarks) or in the
    calling thread (`run_forever`, the command)."""

    def __init__(self, served: Served, sock: socket.socket, log_level: str = "warning") -> None:
        import uvicorn

        self.served, self.sock = served, sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self.port = port
        self.uvicorn = uvicorn.Server(uvicorn.Config(served.app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> "Server":
        self._thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])),
                                        name="grun-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GRUNError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def run_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (uvicorn shuts down gracefully, then re-raises the signal: a clean exit)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stopped) if main else None
        try:
            self.uvicorn.run(sockets=[self.sock])
        except (KeyboardInterrupt, _Stopped):
            pass
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            self.served.stop()

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.served.stop()
        self.sock.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grun_fast.models import MODEL_HELP

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="GRUN adapter folder, named NAME (default: the folder's name) in model ids; repeat to "
                             "load several (they apply in this order). Requests pick them with the model field: "
                             "base, base+NAME, base+NAME1+NAME2")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port; the one chosen is printed)")
    parser.add_argument("--no-continuous-batching", action="store_true",
                        help="serve requests one at a time with model.generate (per-request sampling settings)")
    parser.add_argument("--sample", action="store_true",
                        help="continuous batching: sample with the model's generation config for every request "
                             "(default: greedy; the engine takes one setting for all requests)")
    parser.add_argument("--kv-cache-tokens", type=int, default=EngineSettings.cache_tokens,
                        help="tokens the engine's KV cache holds over all requests; also caps one request's prompt "
                             "plus completion")
    parser.add_argument("--max-batch-tokens", type=int, default=EngineSettings.max_batch_tokens,
                        help="tokens per engine step (longer prompts are prefilled in chunks)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="model weights dtype")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="uvicorn's log level (transformers' per-request lines show at info)")


def prepare(args: argparse.Namespace) -> tuple[list[tuple[str, str]], socket.socket]:
    """Every check that needs no model weights; returns the adapters (name, folder) and the bound socket."""
    require_serving()
    from grun_fast.adapters import read_adapter
    from grun_fast.evaluation.command import _check_adapters
    from grun_fast.models import check_model
    from grun_fast.serve_models import Stacks, ServedAdapter

    for key in ("kv_cache_tokens", "max_batch_tokens"):
        if getattr(args, key) < 1:
            raise GRUNError(f"--{key.replace('_', '-')} must be >= 1")
    check_model(args.model)
    adapters = [parse_adapter(spec) for spec in args.adapter]
    Stacks(str(args.model), [ServedAdapter(n, f) for n, f in adapters])  # names unique, not too many
    for name, folder in adapters:
        if read_adapter(folder)[0]["config"].positions == "mask":
            raise GRUNError(f"adapter {name} ({folder}) has positions='mask': it edits only tokens named by "
                            "grun_fast.edit_at, which a served request cannot name; serve a last_prompt or all adapter")
    _check_adapters(args.model, [folder for _, folder in adapters])
    return adapters, bind(args.host, args.port)


def run(args: argparse.Namespace) -> int:
    import grun_fast
    from grun_fast.models import load_model

    adapters, sock = prepare(args)
    served = None
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        for name, folder in adapters:
            grun_fast.patch(model, folder, name=name)
        settings = EngineSettings(cache_tokens=args.kv_cache_tokens, max_batch_tokens=args.max_batch_tokens)
        served = build(model, tokenizer, adapters, str(args.model), not args.no_continuous_batching, settings,
                       verbose=args.log_level in ("info", "debug"))
        served.start_engine(sample=args.sample)
    except BaseException:
        sock.close()
        if served is not None:  # an engine thread left running would keep the process alive
            served.stop()
        raise
    server = Server(served, sock, args.log_level)
    ids = ", ".join(served.models.stacks.ids)
    print(f"grun-fast serve: {server.url}/v1 (model ids: {ids}; "
          f"{'continuous batching' if served.continuous_batching else 'one request at a time'}; "
          f"at most {served.limits.tokens} tokens per request)", file=sys.stderr, flush=True)
    server.run_forever()
    return 0
