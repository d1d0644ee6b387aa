"""Decoding under torch.compile with a static KV cache (issue 13, item 4: the part a CPU can check).

A static cache keeps its length on the device, so the per-forward record (grun_fast.positions) takes it as a
tensor there and works the edited tokens out on the device; generate's decode steps past the prompt carry no
adapter op at all for `last_prompt` adapters. Checked here with `backend="aot_eager"` and `fullgraph=True` (a
graph break raises): tokens equal eager generate's, the patched tokens differ from the base model's, one decode
graph serves every step, and the tensor-start selections equal the host rules. What a CPU cannot check (CUDA
graphs under mode="reduce-overhead", the overhead) is bench/gpu_check.sh's step 5.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import transformers

import grun_fast
from grun_fast import GRUNConfig, GRUNError, positions
from grun_fast.module import GatedLoReFT
from tests.conftest import tiny_model
from tests.test_positions import PROMPTS, left_padded, strong

KINDS = {"last_prompt": [("default", "last_prompt")], "all": [("default", "all")],
         "stacked": [("first", "last_prompt"), ("second", "all")]}
NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def patched(kind: str) -> torch.nn.Module:
    """The tiny Llama with strong adapters (gate open, large edit): a missed or extra edit changes the tokens."""
    model = tiny_model("llama")
    for i, (name, mode) in enumerate(KINDS[kind]):
        torch.manual_seed(3 + i)
        grun_fast.patch(model, GRUNConfig(layers=[1, 2], positions=mode), name=name)
        strong(model, name)
    return model


def prompts(batch: str) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(PROMPTS[1:2] if batch == "one" else PROMPTS)  # "mixed": 3 lengths, left-padded


def generate(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             **kw)
    return out[:, ids.shape[1]:]


def compile_config(graphs: list) -> transformers.CompileConfig:
    """transformers' own compilation (prefill eager, decode steps compiled, as on a GPU with a static cache),
    recording each graph into `graphs` and running it eagerly."""

    def backend(graph, example_inputs):  # a function: the config deep-copies its backend
        graphs.append(graph)
        return graph.forward

    config = transformers.CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def sigmoids(graph: torch.fx.GraphModule) -> int:
    """Adapter gates in a graph (the tiny Llama's MLP uses SiLU, not sigmoid)."""
    return sum(1 for node in graph.graph.nodes if node.op == "call_function" and "sigmoid" in str(node.target))


@pytest.mark.slow  # 10-22 s each on a loaded 2-core machine (two graphs traced)
@pytest.mark.parametrize("batch", ["one", "mixed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_static_generate_gives_eager_tokens(kind, batch):
    """model.forward compiled with fullgraph=True: no graph break in the prefill or the decode step, the tokens
    of eager generate (each prompt end edited once: `last_prompt` decode steps hold no adapter op, `all` ones
    one gate per edited layer), one decode graph for every step and no recompilation on the next call."""
    model = patched(kind)
    ids, mask = prompts(batch)
    eager = generate(model, ids, mask)
    with grun_fast.disable_adapters(model):
        base = generate(model, ids, mask)
    assert not torch.equal(eager, base)  # the adapters change the tokens
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model.forward = torch.compile(model.forward, backend=counter, fullgraph=True)
    assert torch.equal(generate(model, ids, mask, cache_implementation="static"), eager)
    assert counter.frame_count == 2  # prefill and one decode graph for NEW_TOKENS - 1 steps
    prefill, decode = counter.graphs
    edits_all = sum(1 for _, mode in KINDS[kind] if mode == "all")
    assert sigmoids(prefill) == 2 * len(KINDS[kind])
    assert sigmoids(decode) == 2 * edits_all
    again = generate(model, ids.flip(0), mask.flip(0), cache_implementation="static")
    assert torch.equal(again, eager.flip(0)) and counter.frame_count == 2


def test_transformers_compile_config_decodes_with_adapters():
    """generate's own compilation (`compile_config`: prefill eager, decode steps compiled, as on a GPU with
    cache_implementation='static') gives eager tokens with stacked adapters on a left-padded batch."""
    model = patched("stacked")
    ids, mask = prompts("mixed")
    eager = generate(model, ids, mask)
    graphs = []
    config = compile_config(graphs)
    assert torch.equal(generate(model, ids, mask, cache_implementation="static", compile_config=config), eager)
    assert len(graphs) == 1 and sigmoids(graphs[0]) == 2  # the decode step: the `all` adapter's two layers


def test_graphs_compiled_before_patch_do_not_run_without_the_adapters():
    """torch.compile does not guard on module hooks by default: a decode graph compiled for an unpatched model
    (this one before patch, or another of its class) ran on without the adapters, silently. patch turns the
    hook guards on and drops code compiled without them; the unpatched model keeps its own tokens."""
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # dynamo's default, as in a fresh process
        ids, mask = prompts("mixed")
        config = compile_config([])
        other, model = tiny_model("llama"), tiny_model("llama")
        base = generate(other, ids, mask)
        static = dict(cache_implementation="static", compile_config=config)
        assert torch.equal(generate(other, ids, mask, **static), base)
        assert torch.equal(generate(model, ids, mask, **static), base)
        torch.manual_seed(3)
        grun_fast.patch(model, GRUNConfig(layers=[1, 2], positions="all"))
        strong(model)
        eager = generate(model, ids, mask)
        assert not torch.equal(eager, base)
        assert torch.equal(generate(model, ids, mask, **static), eager)
        assert torch.equal(generate(other, ids, mask, **static), base)
        grun_fast.unpatch(model)
        assert torch.equal(generate(model, ids, mask, **static), base)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_step_outside_generate_has_no_graph_break(kind):
    """A static-cache step called directly (no generate, no edit_at): rule 3 on the device, zero graph breaks
    (torch._dynamo.explain), and the logits of the same step run eagerly."""
    model = patched(kind)
    ids = torch.randint(1, 97, (2, 5))
    outputs = []
    for explain in (False, True):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            first = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            step = dict(input_ids=first, cache=cache, position_ids=torch.full((2, 1), 5), use_cache=True)
            if explain:
                report = torch._dynamo.explain(model)(**step)
                assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
                cache = transformers.StaticCache(config=model.config, max_cache_len=16)
                model(input_ids=ids, cache=cache, use_cache=True)
                step["cache"] = cache
                outputs.append(torch.compile(model, backend="aot_eager", fullgraph=True)(**step).logits)
            else:
                outputs.append(model(**step).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_parameters_changed_between_calls_are_used_without_recompiling():
    """The fold a compiled step reads is refreshed in place by generate: new adapter weights take effect on
    the next call, with no recompilation."""
    model = patched("all")
    ids, mask = prompts("mixed")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model.forward = torch.compile(model.forward, backend=counter, fullgraph=True)
    first = generate(model, ids, mask, cache_implementation="static")
    frames = counter.frame_count
    with torch.no_grad():
        for module in grun_fast.adapter_modules(model).values():
            module.bias.mul_(-1.5)
    second = generate(model, ids, mask, cache_implementation="static")
    assert counter.frame_count == frames
    del model.forward  # eager again
    assert torch.equal(second, generate(model, ids, mask)) and not torch.equal(second, first)


def test_mask_adapter_without_edit_at_fails_under_compile():
    """A `mask` adapter has no tokens without edit_at, and under compile whether a forward starts the sequence
    is known only on the device: the GRUNError, not a silent no-op (with fullgraph=True dynamo reports it as
    an Unsupported error carrying the message; without, the frame falls back to eager, where the start is known
    and the eager rule applies)."""
    model = tiny_model("llama")
    grun_fast.patch(model, GRUNConfig(layers=[1], positions="mask"))
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(1, 97, (1, 4))
    with torch.no_grad():
        with grun_fast.edit_at(model, positions=torch.tensor([3])):
            model(input_ids=ids, cache=cache, use_cache=True)
        step = torch.compile(model, backend="aot_eager", fullgraph=True)
        with pytest.raises((GRUNError, torch._dynamo.exc.Unsupported), match="positions='mask'.*torch.compile"):
            step(input_ids=ids[:, :1], cache=cache, position_ids=torch.tensor([[4]]), use_cache=True)


# ---- the selections with the start on the device equal the host rules ----------------------------------------


def as_mask(selection, batch: int, length: int) -> torch.Tensor:
    if selection is None:
        return torch.zeros(batch, length, dtype=torch.bool)
    kind, value = selection
    if kind == "all":
        return torch.ones(batch, length, dtype=torch.bool)
    if kind == "mask":
        return value
    return torch.arange(length)[None, :] == value[:, None]


def specs() -> dict[str, positions.EditSpec]:
    ends = torch.tensor([4, 6])
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [1, 5]] = mask[1, 7] = True
    return {"generate": positions.EditSpec.from_positions(ends, source="generate"),
            "edit_at positions": positions.EditSpec.from_positions(ends),
            "edit_at mask": positions.EditSpec.from_mask(mask),
            "relative": positions.EditSpec.from_positions(torch.tensor([0, 1]), relative=True)}


@pytest.mark.parametrize("spec_name", [None, *specs()])
def test_device_start_selects_the_host_rule_tokens(spec_name):
    """For every start and length of a forward continuing a sequence (prefill, chunks, decode steps), the
    [B, T] mask worked out from a 0-d start tensor names the tokens the host rules name."""
    for start in range(0, 9):
        for length in (1, 2, 3) if start else (7, 8, 9):
            spec = None if spec_name is None else specs()[spec_name]  # a fresh one per call: the host rule may
            if spec is not None and spec.kind == "mask" and start == 0 and length != 9:
                continue  # a forward starting the sequence must match the mask's width (a host-side check)
            if spec_name == "relative" and length < 2:
                continue
            host = positions.select(positions.Forward(start, None), spec, "last_prompt", "a", 2, length,
                                    torch.device("cpu"), spec_name == "generate")
            spec = None if spec_name is None else specs()[spec_name]  # mark a generate spec processed
            device = positions.select(positions.Forward(torch.tensor(start), None), spec, "last_prompt", "a", 2,
                                      length, torch.device("cpu"), spec_name == "generate")
            assert torch.equal(as_mask(device, 2, length), as_mask(host, 2, length)), (start, length)


def test_processed_generate_spec_selects_nothing_on_the_device():
    """Once a forward with a known start passed every prompt end, later forwards of the generate call (decode
    steps, start on the device) edit nothing and compute nothing; before that, a device mask."""
    spec = positions.EditSpec.from_positions(torch.tensor([4, 6]), source="generate")
    cpu = torch.device("cpu")
    assert positions.select(positions.Forward(0, None), spec, "last_prompt", "a", 2, 5, cpu, True) is not None
    assert not spec.processed  # column 6 is not in [0, 5)
    assert positions.select(positions.Forward(torch.tensor(7), None), spec, "last_prompt", "a", 2, 1, cpu,
                            True)[0] == "mask"
    positions.select(positions.Forward(5, None), spec, "last_prompt", "a", 2, 2, cpu, True)
    assert spec.processed
    assert positions.select(positions.Forward(torch.tensor(7), None), spec, "last_prompt", "a", 2, 1, cpu,
                            True) is None


def test_mask_adapter_without_spec_fails_with_a_device_start():
    with pytest.raises(GRUNError, match="only on the device"):
        positions.select(positions.Forward(torch.tensor(0), None), None, "mask", "m", 1, 3, torch.device("cpu"),
                         False)


def test_compiled_inference_uses_the_cached_fold_and_the_kernel_op(monkeypatch):
    """Compiled inference reads the module's cached fold (no data-pointer or version reads: those break the
    graph) and, on the Triton backend, runs one custom op (here in the interpreter): outputs equal eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GRUN_FAST_IMPL", "triton")
    torch.manual_seed(0)
    module = GatedLoReFT(32, rank=4)
    h = torch.randn(2, 3, 32)
    rows = torch.rand(2, 3) < 0.5
    with torch.no_grad():
        want = module(h, rows=rows)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        got = torch.compile(module, backend=counter, fullgraph=True)(h, rows=rows)
    graph = counter.graphs[0]
    assert any("gated_loreft_folded_fwd" in str(node.target) for node in graph.graph.nodes), graph.code
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
