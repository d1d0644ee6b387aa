"""Which tokens get edited: the explicit per-forward record (grun_fast.positions) under generate, use_cache=False,
chunked prefill, inference mode, mask adapters, bad edit_at input, and the disable switch."""
import pytest
import torch

import grun_fast
from grun_fast import GRUNConfig, GRUNError
from grun_fast.architectures import locate
from tests.conftest import tiny_model


def strong(model, name="default"):
    """Gate wide open and a large edit, so an edit at a wrong token changes the greedy tokens."""
    for module in grun_fast.adapter_modules(model, name).values():
        with torch.no_grad():
            module.gate.bias.fill_(30.0)
            module.bias.mul_(8)


def patch_strong(model, positions="last_prompt", weights=None):
    """Patch a strong adapter at layers 1 and 2 (seeded, or with the given weights); return its weights."""
    torch.manual_seed(3)
    grun_fast.patch(model, GRUNConfig(layers=[1, 2], positions=positions))
    if weights is None:
        strong(model)
    else:
        model.grun_adapters.load_state_dict(weights)
    return {k: v.clone() for k, v in model.grun_adapters.state_dict().items()}


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def greedy(model, ids, mask, **kw):
    kw = {"do_sample": False, **kw}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


PROMPTS = [torch.tensor([5, 9, 14]), torch.tensor([3, 8, 21, 40, 7, 2, 11]), torch.tensor([60, 1, 33, 4, 90])]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_use_cache_false_generates_the_cached_run_tokens(model_type):
    """Without a KV cache every generate step is a full forward from token 0; the edit stays on the prompt's
    last token (it used to land on the newest token of every step)."""
    model = tiny_model(model_type)
    ids, mask = left_padded(PROMPTS)
    base = greedy(model, ids, mask)
    grun_fast.patch(model, GRUNConfig(layers=[1, 2]))
    strong(model)
    cached = greedy(model, ids, mask)
    uncached = greedy(model, ids, mask, use_cache=False)
    assert not torch.equal(cached, base)  # the adapter changes the tokens
    assert torch.equal(uncached, cached)


def test_expanded_rows_keep_their_prompt_end(llama):
    """num_return_sequences repeats each prompt's row in place; each copy is edited at its prompt's end
    (sampling with top_k=1 is greedy)."""
    grun_fast.patch(llama, GRUNConfig(layers=[1]))
    strong(llama)
    singles = [greedy(llama, p[None], torch.ones(1, len(p), dtype=torch.long))[0] for p in PROMPTS[:2]]
    ids, mask = left_padded(PROMPTS[:2])
    doubled = greedy(llama, ids, mask, num_return_sequences=2, do_sample=True, top_k=1)
    for i in range(2):
        assert torch.equal(doubled[2 * i], singles[i]) and torch.equal(doubled[2 * i + 1], singles[i])


def test_chunked_prefill_edits_the_last_prompt_token_in_its_chunk(llama):
    """A prompt prefilled in chunks (forwards continuing the cache) is edited exactly once, in the chunk that
    holds its last token: the logits equal the one-forward prefill's."""
    grun_fast.patch(llama, GRUNConfig(layers=[1, 2]))
    strong(llama)
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        whole = llama(ids).logits[:, -1]
        spec = grun_fast.positions.EditSpec.from_positions(torch.tensor([9, 9]), source="generate")
        state = llama._grun_state
        state.generation = spec  # what the patched generate records before a chunked prefill
        try:
            out = llama(ids[:, :4], use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            out = llama(ids[:, 4:8], cache=cache, use_cache=True)
            out = llama(ids[:, 8:], cache=cache, use_cache=True)
        finally:
            state.generation = None
    torch.testing.assert_close(out.logits[:, -1], whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without the record, the first chunk's end would be taken for the prompt's end
        out = llama(ids[:, :4], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        llama(ids[:, 4:8], cache=cache, use_cache=True)
        wrong = llama(ids[:, 8:], cache=cache, use_cache=True).logits[:, -1]
    assert not torch.allclose(wrong, whole, atol=1e-3)


def test_patch_and_generate_inside_inference_mode(llama):
    """Serving code loads adapters under torch.inference_mode; the fold cache used to crash there."""
    ids, mask = left_padded(PROMPTS)
    weights = patch_strong(llama)
    want = greedy(llama, ids, mask)
    grun_fast.unpatch(llama)
    with torch.inference_mode():
        patch_strong(llama, weights=weights)
        got = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, ids.shape[1]:], want)
    assert not any(p.is_inference() for p in grun_fast.adapter_parameters(llama))


def test_mask_adapter_in_generate_needs_edit_at(llama):
    ids, mask = left_padded(PROMPTS)
    weights = patch_strong(llama)
    want = greedy(llama, ids, mask)
    grun_fast.unpatch(llama)
    patch_strong(llama, "mask", weights)
    with pytest.raises(GRUNError, match="positions='mask'.*generate"):
        greedy(llama, ids, mask)
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    with grun_fast.edit_at(llama, mask=last):
        assert torch.equal(greedy(llama, ids, mask), want)
        assert torch.equal(greedy(llama, ids, mask, use_cache=False), want)


def test_bad_edit_positions_fail_before_any_layer_runs(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[2]))
    calls = []
    handle = locate(llama)[1][0].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, 97, (1, 9))
    with pytest.raises(GRUNError, match=">= 0"):
        with grun_fast.edit_at(llama, positions=torch.tensor([-1])):
            pass
    with pytest.raises(GRUNError, match="integer tensor"):
        with grun_fast.edit_at(llama, positions=torch.tensor([1.0])):
            pass
    with torch.no_grad(), grun_fast.edit_at(llama, positions=torch.tensor([50])):
        with pytest.raises(GRUNError, match="token 50, past the end of this 9-token forward"):
            llama(ids)
    with torch.no_grad(), grun_fast.edit_at(llama, positions=torch.tensor([3, 4])):
        with pytest.raises(GRUNError, match="2 rows but the forward has batch 3"):
            llama(torch.randint(1, 97, (3, 9)))
    assert calls == []  # nothing ran
    handle.remove()


def test_disable_adapters_gives_the_base_or_the_other_adapters(llama):
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        base = llama(ids).logits
        grun_fast.patch(llama, GRUNConfig(layers=[1]), name="a")
        strong(llama, "a")
        only_a = llama(ids).logits
        grun_fast.patch(llama, GRUNConfig(layers=[1, 2]), name="b")
        strong(llama, "b")
        both = llama(ids).logits
        with grun_fast.disable_adapters(llama):
            assert torch.equal(llama(ids).logits, base)
        with grun_fast.disable_adapters(llama, "b"):
            assert torch.equal(llama(ids).logits, only_a)
            with grun_fast.disable_adapters(llama, ["a"]):
                assert torch.equal(llama(ids).logits, base)
            assert torch.equal(llama(ids).logits, only_a)
        assert torch.equal(llama(ids).logits, both) and not torch.equal(both, only_a)
    with pytest.raises(GRUNError, match="no adapter named 'c'"):
        with grun_fast.disable_adapters(llama, "c"):
            pass


def test_unpatch_restores_generate(llama):
    original = type(llama).generate
    grun_fast.patch(llama, GRUNConfig(layers=[1]))
    assert "generate" in vars(llama)
    grun_fast.unpatch(llama)
    assert "generate" not in vars(llama) and llama.generate.__func__ is original


def test_evaluation_generation_applies_mask_adapters_at_the_prompt_end(llama):
    """evaluate()'s own batched decoding names the last prompt token explicitly: a mask adapter generates what
    the same weights give as a last_prompt adapter (it used to be skipped at generation, applied in scoring)."""
    from grun_fast.evaluation.generation import _Decoder

    prompts = [p.tolist() for p in PROMPTS]
    weights = patch_strong(llama)
    decoder = _Decoder(llama, pad_id=0, eos_ids=set(), max_new_tokens=5)
    bar = type("Bar", (), {"update": lambda self, n: None})()
    want = decoder.run(prompts, 2, bar)
    grun_fast.unpatch(llama)
    base = decoder.run(prompts, 2, bar)
    patch_strong(llama, "mask", weights)
    assert decoder.run(prompts, 2, bar) == want and want != base


def test_evaluate_reports_no_gates_for_switched_off_adapters(llama):
    from grun_fast.evaluation.scoring import gate_modules

    grun_fast.patch(llama, GRUNConfig(layers=[1]), name="a")
    grun_fast.patch(llama, GRUNConfig(layers=[2]), name="b")
    assert set(gate_modules(llama)) == {"a", "b"}
    with grun_fast.disable_adapters(llama, "a"):
        assert set(gate_modules(llama)) == {"b"} and grun_fast.adapter_names(llama) == ["a", "b"]
        assert grun_fast.adapter_names(llama, enabled_only=True) == ["b"]


def test_packed_step_edits_each_prompt_end_in_the_slice_that_holds_it():
    """Continuous batching packs each request's slice of a step into one row: (tokens cached, tokens in the step,
    prompt length). The prompt's last token is edited in the slice covering it: a whole prefill or the chunk that
    ends the prompt; earlier chunks and decode tokens are not. (generate_batch itself: test_continuous_batching.)"""
    step = grun_fast.positions.packed_step([(0, 3, 3), (0, 4, 9), (4, 5, 9), (7, 1, 5), (2, 2, 3)], tokens=16)
    # whole prompt; first chunk; chunk ending the prompt; decode; re-prefill of prompt + generated (evicted)
    assert step.ends == (2, 11, 13) and step.tokens == 16
    with pytest.raises(GRUNError, match="packed 15 tokens into a 8-token step"):
        grun_fast.positions.packed_step([(0, 15, 15)], tokens=8)
    forward = grun_fast.positions.Forward(0, None, paged=True, packed=step)
    kind, mask = grun_fast.positions.select(forward, None, "last_prompt", "a", 1, 16, torch.device("cpu"), False)
    assert kind == "mask" and mask.nonzero()[:, 1].tolist() == [2, 11, 13]
    with pytest.raises(GRUNError, match="positions='mask': continuous batching"):
        grun_fast.positions.select(forward, None, "mask", "m", 1, 16, torch.device("cpu"), False)
    edit_at = grun_fast.positions.EditSpec.from_positions(torch.tensor([3]))
    with pytest.raises(GRUNError, match="edit_at.*continuous batching packs"):
        grun_fast.positions.select(forward, edit_at, "last_prompt", "b", 1, 16, torch.device("cpu"), False)
    with pytest.raises(GRUNError, match="made before grun_fast.patch"):
        grun_fast.positions.forward_record({}, paged=True, packed=None)


def test_packed_step_with_per_request_adapters_edits_only_the_requests_that_chose_them():
    """Request 0 (whole prompt) chose 'a', request 1 (a decode token) chose nothing, request 2 (the chunk ending its
    prompt) left the choice to the model (None: every adapter)."""
    step = grun_fast.positions.packed_step([(0, 3, 3), (7, 1, 5), (4, 5, 9)], tokens=10,
                                           adapters=[{"a"}, set(), None])
    assert step.routed and step.ends == (2, 8)
    forward = grun_fast.positions.Forward(0, None, paged=True, packed=step)
    cpu = torch.device("cpu")

    def columns(mode, name):
        selection = grun_fast.positions.select(forward, None, mode, name, 1, 10, cpu, False)
        return None if selection is None else selection[1].nonzero()[:, 1].tolist()

    assert columns("last_prompt", "a") == [2, 8] and columns("last_prompt", "b") == [8]
    assert columns("all", "a") == [0, 1, 2, 4, 5, 6, 7, 8] and columns("all", "b") == [4, 5, 6, 7, 8]
    whole = grun_fast.positions.packed_step([(0, 3, 3), (7, 1, 5)], tokens=4, adapters=[None, None])
    assert not whole.routed
    assert grun_fast.positions.select(grun_fast.positions.Forward(0, None, paged=True, packed=whole), None, "all",
                                      "a", 1, 4, cpu, False) == ("all", None)
    only_base = grun_fast.positions.packed_step([(7, 1, 5)], tokens=1, adapters=[set()])
    assert grun_fast.positions.select(grun_fast.positions.Forward(0, None, paged=True, packed=only_base), None,
                                      "all", "a", 1, 1, cpu, False) is None
    with pytest.raises(GRUNError, match="2 adapter selections for 1 packed requests"):
        grun_fast.positions.packed_step([(0, 3, 3)], tokens=3, adapters=[None, None])
