"""`grun-fast serve` under load, on loopback: 64 concurrent requests of mixed lengths against a server with two
GRUN adapters and against the same model served without any, side by side.

Each server is the real command (`python -m grun_fast.cli serve ... --port 0`) in its own process on 127.0.0.1;
this process is the clients (one thread per request). Workloads, interleaved round by round (the order rotates,
so load drift on a shared machine hits all alike):
  plain     the server without adapters, every request `base`
  adapters  the server with both adapters, every request `base+forget-a+forget-b`
  mixed     the server with both adapters, requests cycling over all four ids
Per round: served tokens/s (completion tokens / wall time from first send to last answer), tokens per CPU second
of the server process (steadier on a shared machine) and each request's latency. Every answer is checked against one-by-one greedy `generate` (fp32) with the request's adapters: the same
text (skip_special_tokens) and token count. Each round also sends malformed requests (bad JSON, unknown adapter,
over-long prompt: each must be a 4xx) and one streaming client that leaves after its first chunk; the server must
keep serving. Rows go to bench/results/results.csv, a summary to bench/results/serve_<model>.md ($GRUN_BENCH_OUT moves both).

    python bench/bench_serve.py                      # tiny (d=128, 4 layers), 30 rounds
    python bench/bench_serve.py --model 1b --rounds 2 --prompt-words 3 20 --new 4 8 --check 8 --kv-cache-tokens 4096
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import contextlib
import gc
import http.client
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import grun_fast
from bench.common import append_rows, cpu_model, load_average, now, results_dir
from grun_fast.testing import make_tiny_tokenizer, tiny_llama

SHAPES = {  # Llama shapes with the tiny tokenizer's vocabulary (random weights: timing and equality only)
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, layers=([2], [3])),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, intermediate_size=8192, layers=([10], [12, 15])),
}
ADAPTERS = ("forget-a", "forget-b")
WORKLOADS = ("plain", "adapters", "mixed")
STACKS = ["base", "base+forget-a", "base+forget-b", "base+forget-a+forget-b"]
WORDS = ("the quick brown fox jumps over a lazy dog while an author named Basil wrote books about wizards "
         "rivers mountains and old kings in the year 1920 near the sea").split()


def build_folders(shape: str, root: _Path) -> tuple[_Path, dict[str, _Path]]:
    """A random Llama of `shape` with a tiny BPE tokenizer, and two last-prompt adapters with wide-open gates
    and large edits (so a wrongly placed edit changes the tokens), saved as folders."""
    spec = dict(SHAPES[shape])
    layers = spec.pop("layers")
    tok = make_tiny_tokenizer([" ".join(random.Random(i).choices(WORDS, k=30)) for i in range(200)], 1500)
    model = tiny_llama(tok, max_positions=1024, **spec)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    folders = {}
    for seed, (name, at) in enumerate(zip(ADAPTERS, layers)):
        torch.manual_seed(seed)
        grun_fast.patch(model, grun_fast.GRUNConfig(layers=at, positions="last_prompt"), name=name)
        for module in grun_fast.adapter_modules(model, name).values():
            with torch.no_grad():
                module.gate.bias.fill_(30.0)
                module.bias.mul_(8.0)
        folders[name] = grun_fast.save_adapter(model, root / name, name=name)
    return root / "model", folders


def requests_for(count: int, prompt_words: tuple[int, int], new: tuple[int, int], seed: int) -> list[dict]:
    """Mixed lengths: prompts of prompt_words[0]..[1] words, max_tokens new[0]..new[1]."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(*prompt_words))), "max_tokens": rng.randint(*new)}
            for _ in range(count)]


def references(folder: _Path, folders: dict[str, _Path], jobs: set[tuple[str, int, str]]) -> dict:
    """(prompt, max_tokens, stack) -> (text, token count) from one-by-one greedy generate, fp32."""
    from grun_fast.models import load_model

    model, tok = load_model(folder, dtype="float32", device="cpu")
    for name, path in folders.items():
        grun_fast.patch(model, path, name=name)
    out = {}
    for prompt, new, stack in sorted(jobs):
        ids = tok(prompt).input_ids
        off = [n for n in ADAPTERS if n not in stack.split("+")[1:]]
        with torch.inference_mode(), grun_fast.disable_adapters(model, off) if off else contextlib.nullcontext():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0,
                                    eos_token_id=tok.eos_token_id)[0, len(ids):]
        out[(prompt, new, stack)] = (tok.decode(tokens, skip_special_tokens=True), len(tokens))
    return out


class ServerProcess:
    """`grun-fast serve` in its own process on 127.0.0.1, a free port."""

    def __init__(self, model: _Path, adapters: dict[str, _Path], threads: int, cache_tokens: int):
        command = [_sys.executable, "-m", "grun_fast.cli", "serve", "--model", str(model), "--port", "0",
                   "--device", "cpu", "--kv-cache-tokens", str(cache_tokens)]
        for name, path in adapters.items():
            command += ["--adapter", f"{name}={path}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        line, deadline = "", time.monotonic() + 600
        while "/v1 (model ids" not in line:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {line}{self.process.stderr.read()}")
            line = self.process.stderr.readline()
        self.announce = line.strip()
        self.host, self.port = line.split("http://")[1].split("/v1")[0].rsplit(":", 1)
        self.log: list[str] = []  # the server's stderr (kept drained), shown when a request fails
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system), from /proc: steadier than the wall clock when
        other jobs share the machine."""
        fields = _Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def call(self, path: str, body: bytes | None, timeout: float = 600) -> tuple[int, dict, float]:
        start = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            connection.request("POST" if body is not None else "GET", path, body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            try:
                body = json.loads(data) if data else {}
            except json.JSONDecodeError:
                body = {"raw": data.decode(errors="replace")[:200]}
            return response.status, body, time.perf_counter() - start
        finally:
            connection.close()

    def leave_mid_stream(self, body: dict) -> bool:
        """A streaming client that closes its connection after the first chunk; whether it got one."""
        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=600)
        connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        first = response.readline().startswith(b"data: ")
        connection.sock.shutdown(2)
        connection.close()
        return first

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def malformed(server: ServerProcess, limit_words: int) -> list[tuple[str, int]]:
    """(what, status) of the requests that must be refused with a 4xx."""
    long_prompt = " ".join(["fox"] * limit_words)
    sent = [("bad JSON", b'{"model": "base", "prompt": "the fox", "max_tokens": '),
            ("unknown adapter", json.dumps({"model": "base+forget-z", "prompt": "the fox", "max_tokens": 4}).encode()),
            ("over-long prompt", json.dumps({"model": "base", "prompt": long_prompt, "max_tokens": 4}).encode())]
    return [(what, server.call("/v1/completions", body)[0]) for what, body in sent]


def one_round(server: ServerProcess, workload: str, load: list[dict], want: dict, limit_words: int) -> dict:
    """64 concurrent requests (+ malformed ones and a client leaving mid-stream); tokens/s, latencies, errors."""
    stacks = [("base" if workload == "plain" else "base+forget-a+forget-b" if workload == "adapters"
               else STACKS[i % len(STACKS)]) for i in range(len(load))]
    bodies = [json.dumps({**job, "model": stack}).encode() for job, stack in zip(load, stacks)]
    with ThreadPoolExecutor(len(bodies) + 4) as pool:
        cpu = server.cpu_seconds()
        start = time.perf_counter()
        answers = [pool.submit(server.call, "/v1/completions", body) for body in bodies]
        refused = pool.submit(malformed, server, limit_words)
        left = pool.submit(server.leave_mid_stream, {"model": stacks[0], "prompt": load[0]["prompt"],
                                                     "max_tokens": max(job["max_tokens"] for job in load)})
        answers = [a.result() for a in answers]
        wall = time.perf_counter() - start
        cpu = server.cpu_seconds() - cpu
        refused, left = refused.result(), left.result()
    errors, mismatches, tokens = [], [], 0
    for job, stack, (status, body, _) in zip(load, stacks, answers):
        if status != 200:
            errors.append(f"{status} {body}")
            continue
        text, count = body["choices"][0]["text"], body["usage"]["completion_tokens"]
        tokens += count
        expected = want.get((job["prompt"], job["max_tokens"], stack))
        if expected is not None and (text, count) != expected:
            mismatches.append((job["prompt"][:40], stack, text[:30], expected[0][:30]))
    bad = [f"{what}: {status}" for what, status in refused if not 400 <= status < 500]
    health = server.call("/health", None)[0]
    return dict(tokens=tokens, wall=wall, cpu=cpu, latencies=[a[2] for a in answers], errors=errors, mismatches=mismatches,
                checked=sum((j["prompt"], j["max_tokens"], s) in want for j, s in zip(load, stacks)),
                refused=refused, bad_refusals=bad, left_mid_stream=left, healthy=health == 200)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per workload (after one warm-up)")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=[3, 60], help="prompt length range, in words")
    parser.add_argument("--new", type=int, nargs=2, default=[16, 64], help="max_tokens range")
    parser.add_argument("--check", type=int, default=None,
                        help="check this many requests per workload against generate (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server process (on the shared 2-core test machine, 2 threads per "
                             "server made steps cost 1.3-2x the CPU time, unevenly between servers: keep 1 there)")
    parser.add_argument("--kv-cache-tokens", type=int, default=16384,
                        help="each server's KV cache (the 1b shape holds 256 KiB per token: 4 GiB at 16384)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = requests_for(args.requests, tuple(args.prompt_words), tuple(args.new), seed=0)
    checked = load if args.check is None else load[:args.check]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        t0 = time.perf_counter()
        model, folders = build_folders(args.model, _Path(root))
        jobs = {(j["prompt"], j["max_tokens"], s) for j in checked for s in ("base", STACKS[-1])}
        jobs |= {(j["prompt"], j["max_tokens"], STACKS[i % len(STACKS)]) for i, j in enumerate(checked)}
        want = references(model, folders, jobs)
        print(f"{len(want)} references from one-by-one generate in {time.perf_counter() - t0:.0f} s", flush=True)
        gc.collect()  # the reference model (patched: reference cycles) before two servers load theirs
        servers = {"plain": ServerProcess(model, {}, args.threads, args.kv_cache_tokens)}
        try:
            servers["adapters"] = servers["mixed"] = ServerProcess(model, folders, args.threads, args.kv_cache_tokens)
            print(servers["adapters"].announce, flush=True)
            limit_words = 1100  # past the 1024-position limit in any tokenisation
            results = {w: [] for w in WORKLOADS}
            for round_ in range(args.rounds + 1):
                shift = round_ % len(WORKLOADS)
                for workload in WORKLOADS[shift:] + WORKLOADS[:shift]:
                    result = one_round(servers[workload], workload, load, want, limit_words)
                    if round_:
                        results[workload].append(result)
                    print(f"round {round_}{' (warm-up)' if not round_ else ''} {workload:>8}: "
                          f"{result['tokens'] / result['wall']:7.1f} tok/s ({result['tokens'] / result['cpu']:7.1f} "
                          f"per server CPU s), p50 "
                          f"{percentile(result['latencies'], 50):.2f} s, errors {len(result['errors'])}, "
                          f"mismatches {len(result['mismatches'])}/{result['checked']}, refused "
                          f"{[s for _, s in result['refused']]}, healthy {result['healthy']}", flush=True)
        finally:
            for server in {id(s): s for s in servers.values()}.values():
                server.stop()
    return report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> int:
    speed = {w: [r["tokens"] / r["wall"] for r in rs] for w, rs in results.items()}
    per_cpu = {w: [r["tokens"] / r["cpu"] for r in rs] for w, rs in results.items()}
    device = f"cpu: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch thread(s) per server"
    config = (f"llama-{args.model} random fp32, {args.requests} concurrent requests, prompts {args.prompt_words[0]}-"
              f"{args.prompt_words[1]} words, max_tokens {args.new[0]}-{args.new[1]}, greedy, continuous batching "
              f"(kv cache {args.kv_cache_tokens} tokens, 256-token steps)")
    rows, lines = [], []
    failures = 0
    for workload, rs in results.items():
        latencies = [x for r in rs for x in r["latencies"]]
        errors = sum(len(r["errors"]) for r in rs)
        mismatches = sum(len(r["mismatches"]) for r in rs)
        checked = sum(r["checked"] for r in rs)
        bad = sum(len(r["bad_refusals"]) for r in rs) + sum(not r["healthy"] or not r["left_mid_stream"] for r in rs)
        failures += errors + mismatches + bad
        ratio = [s / p for s, p in zip(speed[workload], speed["plain"])]
        cpu_ratio = [s / p for s, p in zip(per_cpu[workload], per_cpu["plain"])]
        common = dict(op="serve", provider=workload, mode="last_prompt" if workload != "plain" else "none",
                      d=SHAPES[args.model]["hidden_size"], dtype="fp32", device=device, date=now(), config=config,
                      batch=args.requests)
        rows.append(dict(common, median=statistics.median(speed[workload]), p20=min(speed[workload]),
                         p80=max(speed[workload]), unit="tok/s",
                         note=f"{len(rs)} rounds (p20/p80 columns: min/max); errors={errors}; "
                              f"mismatches={mismatches}/{checked}; bad_4xx_or_health={bad}; {load_average()}"))
        rows.append(dict(common, op="serve_latency", median=percentile(latencies, 50), p20=percentile(latencies, 50),
                         p80=percentile(latencies, 99), unit="s", note="median=p50, p80 column=p99, over all rounds"))
        rows.append(dict(common, op="serve_tokens_per_cpu_s", median=statistics.median(per_cpu[workload]),
                         p20=min(per_cpu[workload]), p80=max(per_cpu[workload]), unit="tok/cpu_s",
                         note="completion tokens per CPU second of the server process (p20/p80 columns: min/max)"))
        if workload != "plain":
            rows.append(dict(common, op="serve_throughput_ratio", median=statistics.median(ratio), p20=min(ratio),
                             p80=max(ratio), unit="x plain", note="per-round ratio to the plain server's round"))
            rows.append(dict(common, op="serve_cpu_ratio", median=statistics.median(cpu_ratio), p20=min(cpu_ratio),
                             p80=max(cpu_ratio), unit="x plain", note="tokens per server CPU second, per-round ratio"))
        lines.append(f"| {workload} | {statistics.median(speed[workload]):.1f} ({min(speed[workload]):.1f}-"
                     f"{max(speed[workload]):.1f}) | {statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f})"
                     f" | {statistics.median(per_cpu[workload]):.1f} | {statistics.median(cpu_ratio):.3f} "
                     f"({min(cpu_ratio):.3f}-{max(cpu_ratio):.3f})"
                     f" | {percentile(latencies, 50):.2f} / {percentile(latencies, 99):.2f} | {errors} | "
                     f"{checked - mismatches}/{checked} | {bad} |")
    table = "\n".join(["| workload | served tok/s, median (min-max) | vs plain: per-round ratio, median (min-max) | "
                       "tok per server CPU s | vs plain (CPU) | latency p50 / p99 (s) | errors | "
                       "answers equal to generate | bad 4xx / health / stream |",
                       "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *lines])
    print(table)
    if not args.no_csv:
        print("appended to", append_rows(rows))
        out = results_dir() / f"serve_{args.model}.md"
        out.write_text(f"# grun-fast serve under load: {args.model}\n\n{now()}, {device}, {load_average()}.\n\n"
                       f"{config}; {len(next(iter(results.values())))} measured rounds per workload, interleaved. "
                       "plain: the server without adapters; adapters: both adapters on every request; mixed: "
                       f"requests cycle over {', '.join(STACKS)}. Each round also sent bad JSON, an unknown adapter "
                       "and an over-long prompt (each must get a 4xx) and a streaming client that left after its "
                       f"first chunk.\n\n{table}\n\nCommand: `python bench/bench_serve.py "
                       f"{' '.join(_sys.argv[1:])}`\n")
        print("wrote", out)
    return 1 if failures else 0


if __name__ == "__main__":
    _sys.exit(main())
