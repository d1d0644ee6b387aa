"""Serving overhead: `generate` on an unpatched model vs the same model patched in last_prompt / all mode.

Random weights are enough for timing. Each configuration runs alternately with the unpatched model in one
process; overhead = median over repeats of patched / unpatched - 1, each pair timed back to back (drift cancels);
on CPU also in process CPU seconds (steadier than the wall clock on a shared machine).
Rows go to bench/results/results.csv.

With --compile MODE: compiled decoding instead (`run_compiled`): generate with a static KV cache and transformers'
compile_config (prefill eager, decode steps compiled; CUDA graphs under MODE=reduce-overhead on a GPU), on an
unpatched model and one patched model per mode with the same weights, alternated round-robin.

    python -m bench.bench_serving                 # d=512, 8 layers, adapter at [4, 6, 7], batch 1
    python -m bench.bench_serving --batch 1 8 32 --model 8b   # on a GPU
    python -m bench.bench_serving --model 1b --batch 1 8 32 --compile reduce-overhead   # on a GPU
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import time

import torch
import transformers

import grun_fast
from bench.common import append_rows, device_name, now, quantiles, synchronize

# Llama shapes (random weights) and the adapter layers used on each: GRUN's 20, 25, 31 of 32 scaled down.
MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "d512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
ADAPTER_LAYERS = {"tiny": [2, 3], "d512": [4, 6, 7], "1b": [10, 12, 15], "8b": [20, 25, 31]}


def build(model: str, device: str, dtype: torch.dtype, vocab: int = 32000) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, **MODELS[model])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B-shaped model on CPU first takes minutes
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def run(model_name: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int, device: str,
        dtype: torch.dtype, modes: list[str]) -> list[dict]:
    model = build(model_name, device, dtype)
    layers = ADAPTER_LAYERS[model_name]
    rows = []
    for batch in batches:
        ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device=device)
        mask = torch.ones_like(ids)

        def generate():
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)

        cpu = torch.device(device).type == "cpu"
        clocks = ("wall", "cpu") if cpu else ("wall",)
        for mode in modes:
            samples = {c: {"unpatched": [], mode: []} for c in clocks}
            config = grun_fast.GRUNConfig(layers=layers, positions=mode)
            generate()  # warm-up (unpatched, then patched)
            grun_fast.patch(model, config)
            generate()
            grun_fast.unpatch(model)
            for i in range(repeats):  # alternate unpatched / patched, the order swapped every repeat;
                for patched in ((False, True) if i % 2 == 0 else (True, False)):  # patching is not timed
                    if patched:
                        grun_fast.patch(model, config)
                    key = mode if patched else "unpatched"
                    synchronize(device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    generate()
                    synchronize(device)
                    samples["wall"][key].append(time.perf_counter() - t0)
                    if cpu:
                        samples["cpu"][key].append(time.process_time() - c0)
                    if patched:
                        grun_fast.unpatch(model)
            common = dict(d=model.config.hidden_size, dtype=str(dtype).replace("torch.", ""), device=device_name(device),
                          date=now(), config=f"llama-{model_name} layers={layers} new={new_tokens}", batch=batch,
                          note=f"prompt {prompt_len} + {new_tokens} new tokens; {repeats} alternations")
            line = f"{model_name} batch {batch:>3} {mode:>11}:"
            for clock in clocks:
                unit = "s" if clock == "wall" else "cpu_s"
                for provider, values in samples[clock].items():
                    median, p20, p80 = quantiles(values)
                    rows.append(dict(common, op="generate", provider=provider, mode=mode, median=median, p20=p20,
                                     p80=p80, unit=unit))
                    if clock == "wall":
                        tokens = batch * new_tokens
                        rows.append(dict(common, op="generate_tokens_per_s", provider=provider, mode=mode,
                                         median=tokens / median, p20=tokens / p80, p80=tokens / p20, unit="tok/s"))
                # overhead: the median over repeats of patched / unpatched, each pair measured back to back, so
                # drift in the machine's load cancels; p20/p80 of the same pairwise ratios
                ratios = [p / u for p, u in zip(samples[clock][mode], samples[clock]["unpatched"])]
                overhead, r20, r80 = (x - 1 for x in quantiles(ratios))
                rows.append(dict(common, op="generate_overhead", provider=mode, mode=mode, median=overhead, p20=r20,
                                 p80=r80, unit="fraction" if clock == "wall" else "fraction_cpu"))
                line += (f" [{clock}] unpatched {quantiles(samples[clock]['unpatched'])[0] * 1e3:7.1f} ms, "
                         f"patched {quantiles(samples[clock][mode])[0] * 1e3:7.1f} ms, overhead {overhead * 100:+.2f} %"
                         f" (p20 {100 * r20:+.1f}, p80 {100 * r80:+.1f})")
            print(line, flush=True)
    return rows


def run_compiled(model_name: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int, device: str,
                 dtype: torch.dtype, modes: list[str], compile_mode: str, csv: bool = True) -> list[dict]:
    """Compiled static-cache generate: unpatched vs patched (one model per mode, same weights: patching one model
    back and forth would recompile every time), each round in a rotating order after two warm-up calls per model
    (compilation, CUDA graph recording); overhead = median over rounds of patched / unpatched - 1. Rows are
    appended after each batch when `csv` (a run cut by a timeout keeps what it measured)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # the models share one compiled code object (their __call__)
    layers = ADAPTER_LAYERS[model_name]
    models = {"unpatched": build(model_name, device, dtype)}
    for mode in modes:
        models[mode] = grun_fast.patch(build(model_name, device, dtype),
                                       grun_fast.GRUNConfig(layers=layers, positions=mode))
    config = transformers.CompileConfig(fullgraph=True, mode=None if compile_mode == "default" else compile_mode)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    cpu = torch.device(device).type == "cpu"
    clock = time.process_time if cpu else time.perf_counter  # CPU: this process's time, steadier when shared
    unit = "cpu_s" if cpu else "s"
    everything = []
    for batch in batches:
        ids = torch.randint(1, 32000, (batch, prompt_len), device=device)
        mask = torch.ones_like(ids)

        def generate(model):
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, cache_implementation="static", compile_config=config)

        warm = {}
        for name, model in models.items():
            start = time.perf_counter()
            generate(model)
            generate(model)
            synchronize(device)
            warm[name] = time.perf_counter() - start
        graphs = dict(torch._dynamo.utils.counters["stats"])
        samples = {name: [] for name in models}
        names = list(models)
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                synchronize(device)
                start = clock()
                generate(models[name])
                synchronize(device)
                samples[name].append(clock() - start)
        recompiled = dict(torch._dynamo.utils.counters["stats"]) != graphs
        common = dict(d=models["unpatched"].config.hidden_size, dtype=str(dtype).replace("torch.", ""),
                      device=device_name(device), date=now(), batch=batch,
                      config=f"llama-{model_name} layers={layers} new={new_tokens} static cache, compile {compile_mode}",
                      note=f"prompt {prompt_len} + {new_tokens} new tokens; {repeats} rounds; warm-up (compile) s: "
                           + ", ".join(f"{n} {w:.0f}" for n, w in warm.items())
                           + ("; RECOMPILED while timing" if recompiled else ""))
        rows = []
        line = f"{model_name} batch {batch:>3} compiled ({compile_mode}), {unit}:"
        for name, values in samples.items():
            median, p20, p80 = quantiles(values)
            rows.append(dict(common, op="generate_compiled", provider=name, mode=name, median=median, p20=p20,
                             p80=p80, unit=unit))
            line += f" {name} {median * 1e3:.1f} ms"
        for mode in modes:
            ratios = [p / u for p, u in zip(samples[mode], samples["unpatched"])]
            overhead, r20, r80 = (x - 1 for x in quantiles(ratios))
            rows.append(dict(common, op="generate_compiled_overhead", provider=mode, mode=mode, median=overhead,
                             p20=r20, p80=r80, unit="fraction" if unit == "s" else "fraction_cpu"))
            line += f"; {mode} overhead {overhead * 100:+.2f} % (p20 {100 * r20:+.1f}, p80 {100 * r80:+.1f})"
        print(line + ("; RECOMPILED while timing" if recompiled else ""), flush=True)
        if csv:
            append_rows(rows)
        everything += rows
    return everything


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d512", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=["last_prompt", "all"], choices=["last_prompt", "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="compiled static-cache decoding with this torch.compile mode (reduce-overhead: CUDA "
                             "graphs; default: plain inductor)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.compile:
        run_compiled(args.model, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.device, dtype,
                     args.modes, args.compile, csv=not args.no_csv)
        return
    rows = run(args.model, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.device, dtype, args.modes)
    if not args.no_csv:
        print("appended to", append_rows(rows))


if __name__ == "__main__":
    main()
