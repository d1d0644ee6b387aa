"""grun-fast serve: transformers' OpenAI-compatible server around a patched model, on 127.0.0.1 and a free port,
started and stopped here. Completions and chat (streaming or not) give the text one-by-one `generate` gives with
the request's adapters; model ids `base`, `base+forget`, ... pick adapters per request inside one continuous
batch; malformed requests get a 4xx and the server keeps serving; a client that leaves mid-stream frees its slot.
References are computed before the server starts: the engine thread owns the model while it runs."""
from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import grun_fast  # noqa: E402
from grun_fast import GRUNConfig, cli, serve  # noqa: E402
from grun_fast import continuous_batching as cb  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

try:
    serve.require_serving()
except grun_fast.GRUNError as error:  # a transformers whose serving classes serve_models.py does not build on
    pytest.skip(str(error), allow_module_level=True)

torch.set_num_threads(1)

NAMES = ("forget", "style")
STACKS = ["base", "base+forget", "base+style", "base+forget+style"]
PROMPTS = ["w5 w9 w14", "w3 w8 w21 w40 w7 w22 w11 w4 w4 w6 w17 w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w41 w42 w43 "
           "w44 w45 w46 w47 w48 w49 w50 w51 w52 w53 w54", "w60 w61 w33 w4 w90", "w44"]
NEW = 6
CHAT = [{"role": "user", "content": "w12 w13 w14"}]
ENGINE = serve.EngineSettings(cache_tokens=2048, max_batch_tokens=16, page_size=8, max_requests_per_batch=6)


def word_tokenizer():
    """Word-level: one token per `wN` word, decoding to the same text whole or streamed token by token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.chat_template = ("{% for m in messages %}w20 {{ m['content'] }} w21 {% endfor %}"
                         "{% if add_generation_prompt %}w22{% endif %}")
    return out


def patched_model():
    """Tiny Llama with two wide-open adapters: `forget` (last prompt token, layer 1), `style` (every token, 2)."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = 2
    for name, positions, layer, scale, seed in (("forget", "last_prompt", 1, 8.0, 3), ("style", "all", 2, 1.0, 4)):
        torch.manual_seed(seed)
        grun_fast.patch(model, GRUNConfig(layers=[layer], positions=positions), name=name)
        for module in grun_fast.adapter_modules(model, name).values():
            with torch.no_grad():
                module.gate.bias.fill_(30.0)
                module.bias.mul_(scale)
    return model


def reference(model, tok, ids: list[int], stack: str, new: int = NEW) -> str:
    """The text one-by-one greedy generate gives with the adapters of `stack` on."""
    off = [n for n in NAMES if n not in stack.split("+")[1:]]
    with torch.no_grad(), grun_fast.disable_adapters(model, off) if off else contextlib.nullcontext():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=2,
                             pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stream(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            lines = [line.decode().strip() for line in response]
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    tok, model = word_tokenizer(), patched_model()
    want = {(p, s): reference(model, tok, tok(p).input_ids, s) for p in PROMPTS for s in STACKS}
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want_chat = {s: reference(model, tok, chat_ids, s) for s in STACKS}
    assert len({want[(PROMPTS[0], s)] for s in STACKS}) == 4  # every stack changes the answer
    built = serve.build(model, tok, [(n, f"/adapters/{n}") for n in NAMES], "tiny", engine=ENGINE)
    built.start_engine()
    server = serve.Server(built, serve.bind("127.0.0.1", 0)).start()
    engine = built.generation.engine
    try:
        yield server, Client(server.url), want, want_chat
    finally:
        server.stop()
    assert not engine.is_running() and not server._thread.is_alive()


def completion(client: Client, prompt: str, stack: str, **extra) -> tuple[int, dict]:
    return client.call("/v1/completions", {"model": stack, "prompt": prompt, "max_tokens": NEW, **extra})


def test_concurrent_requests_with_different_adapter_stacks_share_the_batch(served, monkeypatch):
    server, client, want, _ = served
    steps = []
    original = cb.packed_step

    def recorded(slices, tokens, adapters=None):
        steps.append(adapters)
        return original(slices, tokens, adapters)

    monkeypatch.setattr(cb, "packed_step", recorded)
    jobs = [(p, s) for p in PROMPTS for s in STACKS] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: completion(client, *job), jobs))
    for (prompt, stack), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert body["model"] == stack and body["choices"][0]["text"] == want[(prompt, stack)], (prompt, stack)
    mixed = [s for s in steps if s and len({a for a in s}) >= 3]
    assert mixed, "no engine step held requests of three different adapter stacks"
    assert server.served.generation.engine._grun_routes == {}


def test_default_model_is_every_adapter_and_streaming_matches(served):
    _, client, want, _ = served
    status, body = client.call("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": NEW})
    assert status == 200 and body["model"] == "base+forget+style"
    assert body["choices"][0]["text"] == want[(PROMPTS[2], "base+forget+style")]
    for stack in ("base", "base+forget"):
        chunks = client.stream("/v1/completions", {"model": stack, "prompt": PROMPTS[1], "max_tokens": NEW})
        assert "".join(c["choices"][0]["text"] for c in chunks) == want[(PROMPTS[1], stack)]
        assert chunks[-1]["usage"]["prompt_tokens"] == len(PROMPTS[1].split())


def test_chat_completions_streaming_and_not(served):
    _, client, _, want_chat = served
    for stack in STACKS:
        status, body = client.call("/v1/chat/completions", {"model": stack, "messages": CHAT, "max_tokens": NEW})
        assert status == 200 and body["choices"][0]["message"]["content"] == want_chat[stack], stack
        chunks = client.stream("/v1/chat/completions", {"model": stack, "messages": CHAT, "max_tokens": NEW})
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == want_chat[stack], stack


def test_models_list_every_stack_with_adapter_names_and_layers(served):
    _, client, _, _ = served
    status, body = client.call("/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == STACKS
    full = body["data"][-1]
    assert [(a["name"], a["layers"], a["positions"]) for a in full["adapters"]] == [
        ("forget", [1], "last_prompt"), ("style", [2], "all")]
    assert body["data"][0]["adapters"] == []
    assert client.call("/health") == (200, {"status": "ok"})


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served):
    _, client, want, _ = served
    cases = [
        (client.call("/v1/completions", raw=b'{"prompt": "w5", "max_tokens": '), 422, ""),
        (completion(client, "w5", "base+nope"), 404, "no adapter named 'nope'"),
        (completion(client, "w5", "base+style+forget"), 404, "write base+forget+style"),
        (completion(client, "w5", "gpt-4"), 404, "served ids: base, base+forget"),
        (completion(client, " ".join(["w7"] * 200), "base"), 400, "the prompt has 200 tokens"),
        (completion(client, "w5 w6", "base", max_tokens=127), 400, "exceed this server's limit of 128"),
        (completion(client, "w5", "base", max_tokens=0), 400, "max_tokens must be an integer >= 1"),
        (completion(client, "w5", "base", temperature="hot"), 400, "temperature must be a number"),
        (completion(client, 5, "base"), 400, "prompt must be a string"),
        (client.call("/v1/chat/completions", {"model": "base", "messages": "hi"}), 400, "non-empty list"),
        (client.call("/v1/chat/completions", {"model": "base", "messages": [{"content": "w5"}]}), 400, "role"),
        (client.call("/v1/completions", {"model": "base", "prompt": "w5", "bogus": 1}), 422, "bogus"),
    ]
    for (status, body), code, message in cases:
        assert status == code and message in json.dumps(body), (status, body, message)
    assert completion(client, PROMPTS[0], "base")[1]["choices"][0]["text"] == want[(PROMPTS[0], "base")]
    status, body = client.call("/v1/completions", {"model": "base", "prompt": "w5 w6"})  # no max_tokens: what fits
    assert status == 200 and body["usage"]["completion_tokens"] <= 128 - 2
    assert client.call("/health") == (200, {"status": "ok"})


def test_a_client_leaving_mid_stream_frees_its_slot(served, monkeypatch):
    """The engine is paused while the client leaves, so the request cannot finish on its own: the engine removes
    it as cancelled, with its cache blocks, and serves on."""
    server, client, want, _ = served
    engine = server.served.generation.engine
    scheduler, cache = engine.batch_processor.scheduler, engine.batch_processor.cache
    free = cache.compute_free_capacity()
    cancelled, removed = [], []
    cancel, clear = engine.cancel_request, scheduler.clear_cancelled_requests
    monkeypatch.setattr(engine, "cancel_request", lambda rid: (cancelled.append(rid), cancel(rid)))
    monkeypatch.setattr(scheduler, "clear_cancelled_requests",
                        lambda: (states := clear(), removed.extend(s.request_id for s in states))[0])
    host, port = server.url.split("//")[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "base+forget", "prompt": PROMPTS[0], "max_tokens": 120, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # its first token
    with engine.pause():
        assert len(scheduler.active_requests) == 1
        connection.sock.shutdown(2)
        connection.close()
        deadline = time.monotonic() + 20
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
    while not removed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cancelled and removed == cancelled  # removed while still running, not finished
    assert not scheduler.active_requests and not scheduler.waiting_requests and engine._grun_routes == {}
    assert cache.compute_free_capacity() == free
    assert completion(client, PROMPTS[3], "base+forget")[1]["choices"][0]["text"] == want[(PROMPTS[3], "base+forget")]


def test_without_continuous_batching_stacks_run_one_at_a_time():
    tok, model = word_tokenizer(), patched_model()
    want = {s: reference(model, tok, tok(PROMPTS[1]).input_ids, s) for s in STACKS}
    built = serve.build(model, tok, [(n, n) for n in NAMES], "tiny", continuous_batching=False)
    with serve.Server(built, serve.bind("127.0.0.1", 0)).start() as server:
        client = Client(server.url)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda s: completion(client, PROMPTS[1], s), STACKS * 2))
    assert [b["choices"][0]["text"] for _, b in answers] == [want[s] for s in STACKS * 2]
    assert grun_fast.adapter_names(model, enabled_only=True) == list(NAMES)


def test_a_model_without_adapters_is_served_as_base():
    """No --adapter: transformers' plain continuous batching (nothing routed), under the one id `base`."""
    tok, model = word_tokenizer(), tiny_model("llama")
    model.generation_config.eos_token_id = 2
    ids = tok(PROMPTS[1]).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
    built = serve.build(model, tok, [], "tiny", engine=ENGINE)
    built.start_engine()
    with serve.Server(built, serve.bind("127.0.0.1", 0)).start() as server:
        client = Client(server.url)
        assert [m["id"] for m in client.call("/v1/models")[1]["data"]] == ["base"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.call("/v1/completions", {"prompt": PROMPTS[1],
                                                                              "max_tokens": NEW}), range(4)))
    assert all(status == 200 and body["model"] == "base" for status, body in answers)
    assert {b["choices"][0]["text"] for _, b in answers} == {tok.decode(out[0, len(ids):], skip_special_tokens=True)}


# --- the command: bad input is one error line and exit status 2, before the model loads ---------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok, model = word_tokenizer(), patched_model()
    grun_fast.save_adapter(model, root / "forget", name="forget")
    grun_fast.unpatch(model)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    grun_fast.patch(model, GRUNConfig(layers=[1], positions="mask"), name="masked")
    grun_fast.save_adapter(model, root / "masked", name="masked")
    grun_fast.unpatch(model)
    other = tiny_model("qwen2")
    grun_fast.patch(other, GRUNConfig(layers=[1]))
    grun_fast.save_adapter(other, root / "qwen")
    return root


def serve_error(capsys, monkeypatch, *argv: str) -> str:
    import grun_fast.models

    monkeypatch.setattr(grun_fast.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["serve", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grun-fast serve: error: ")
    return lines[0]


def test_bad_command_lines_fail_before_loading(folders, capsys, monkeypatch):
    model, forget = str(folders / "model"), str(folders / "forget")
    assert "adapter folder not found: /no/such" in serve_error(capsys, monkeypatch, "--model", model, "--adapter",
                                                               "/no/such")
    assert "model_type 'qwen2'" in serve_error(capsys, monkeypatch, "--model", model, "--adapter",
                                               str(folders / "qwen"))
    assert "two adapters are named 'forget'" in serve_error(capsys, monkeypatch, "--model", model, "--adapter", forget,
                                                            "--adapter", forget)
    assert "adapter name 'a+b'" in serve_error(capsys, monkeypatch, "--model", model, "--adapter", f"a+b={forget}")
    assert "'base' is the id" in serve_error(capsys, monkeypatch, "--model", model, "--adapter", f"base={forget}")
    assert "positions='mask'" in serve_error(capsys, monkeypatch, "--model", model, "--adapter", str(folders / "masked"))
    assert "no such file or folder" in serve_error(capsys, monkeypatch, "--model", "./missing", "--adapter", forget)
    with serve.bind("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in serve_error(capsys, monkeypatch, "--model", model, "--adapter",
                                                                   forget, "--port", port)


@pytest.mark.slow
def test_the_command_serves_until_stopped(folders):
    """`grun-fast serve` in its own process: prints its address, answers, stops on SIGTERM."""
    command = [sys.executable, "-m", "grun_fast.cli", "serve", "--model", str(folders / "model"), "--adapter",
               str(folders / "forget"), "--port", "0", "--kv-cache-tokens", "1024", "--device", "cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "/v1 (model ids" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        assert "model ids: base, base+forget;" in line, line
        client = Client(line.split("serve: ")[1].split("/v1")[0])
        status, body = completion(client, PROMPTS[0], "base+forget")
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        assert [m["id"] for m in client.call("/v1/models")[1]["data"]] == ["base", "base+forget"]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
