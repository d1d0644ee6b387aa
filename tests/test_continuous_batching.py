"""Adapters under transformers' continuous batching (generate_batch / init_continuous_batching): the same tokens
as one-by-one model.generate in fp32, with mixed prompt lengths, more requests than batch slots, prompts split
across prefill chunks and requests evicted and re-prefilled; each request's last prompt token edited once per
prefill (recorded). What cannot be served raises a GRUNError."""
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import grun_fast
from grun_fast import GRUNConfig, GRUNError
from grun_fast.architectures import locate
from tests.conftest import tiny_model

torch.set_num_threads(1)

NEW = 6
PROMPTS = [[5, 9, 14], [3, 8, 21, 40, 7, 2, 11, 4, 4, 6, 17], [60, 1, 33, 4, 90], [7, 12] * 7, [2, 3], [44]]
MAX_BATCH_TOKENS = 8  # below the longest prompts: they are prefilled in chunks
assert max(len(p) for p in PROMPTS) > MAX_BATCH_TOKENS


def engine(**options) -> ContinuousBatchingConfig:
    """A small engine: 8-token steps, 2 requests per step (6 prompts queue), 8-token pages."""
    settings = dict(page_size=8, num_blocks=32, max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=2)
    return ContinuousBatchingConfig(**{**settings, **options})


GREEDY = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)


def batched(model, prompts=PROMPTS, new=NEW, **options) -> list[list[int]]:
    config = GenerationConfig(**{**GREEDY.to_dict(), "max_new_tokens": new})
    out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=engine(**options))
    assert [o.error for o in out.values()] == [None] * len(prompts)
    return [o.generated_tokens for o in out.values()]


def one_by_one(model, prompts=PROMPTS, new=NEW) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(p):].tolist() for p in prompts]


def patch_open(model, positions, layers, name="default", scale=8.0, seed=3):
    """An adapter with its gate wide open and a large edit, so one applied at a wrong token (or not at all)
    changes the greedy tokens."""
    torch.manual_seed(seed)
    grun_fast.patch(model, GRUNConfig(layers=layers, positions=positions), name=name)
    for module in grun_fast.adapter_modules(model, name).values():
        with torch.no_grad():
            module.gate.bias.fill_(30.0)
            module.bias.mul_(scale)


class EditLog:
    """(position in its sequence, token id) of every token an adapter module edits in continuous batching's
    packed forwards, read from the forward's position_ids and input_ids."""

    def __init__(self, model, name="default", layer=1):
        self.edits: Counter = Counter()
        self.step_lengths: list[int] = []
        self._inputs = None
        self._handle = locate(model)[0].register_forward_pre_hook(self._record, with_kwargs=True)
        self._module = grun_fast.adapter_modules(model, name)[layer]
        forward = self._module.forward

        def logged(h, rows=None, **kw):
            positions, ids = self._inputs
            if h.dim() == 3 and h.shape[:2] == positions.shape:
                chosen = torch.ones_like(positions, dtype=torch.bool) if rows is None else rows
                self.edits.update(zip(positions[chosen].tolist(), ids[chosen].tolist()))
            return forward(h, rows=rows, **kw)

        self._module.forward = logged

    def _record(self, module, args, kwargs):
        if kwargs.get("cu_seq_lens_q") is not None:
            self._inputs = (kwargs["position_ids"], kwargs["input_ids"])
            self.step_lengths.append(kwargs["input_ids"].shape[1])

    def close(self):
        self._handle.remove()
        del self._module.forward


def prompt_ends(prompts=PROMPTS) -> Counter:
    return Counter((len(p) - 1, p[-1]) for p in prompts)


@pytest.fixture
def llama():
    return tiny_model("llama")


def test_last_prompt_adapter_matches_generate_and_edits_each_prompt_end_once(llama):
    base = one_by_one(llama)
    assert batched(llama) == base  # the engine itself matches generate on this model
    patch_open(llama, "last_prompt", [1, 2])
    want = one_by_one(llama)
    assert want != base and sum(w != b for w, b in zip(want, base)) >= 4  # the adapter changes the tokens
    log = EditLog(llama)
    got = batched(llama)
    log.close()
    assert got == want
    assert log.edits == prompt_ends()  # exactly the last prompt tokens, each once
    assert max(log.step_lengths) <= MAX_BATCH_TOKENS and len(log.step_lengths) > 2 * len(PROMPTS)


def test_all_adapter_matches_generate_and_edits_every_processed_token(llama):
    base = one_by_one(llama)
    patch_open(llama, "all", [1, 2], scale=1.0)
    want = one_by_one(llama)
    assert want != base
    log = EditLog(llama)
    got = batched(llama)
    log.close()
    assert got == want
    processed = Counter()  # every prompt token and every generated token but the last, once each
    for prompt, tokens in zip(PROMPTS, got):
        sequence = prompt + tokens[:-1]
        processed.update(enumerate(sequence))
    assert log.edits == processed


def test_stacked_last_prompt_and_all_adapters(llama):
    patch_open(llama, "last_prompt", [1], name="forget")
    only_forget = one_by_one(llama)
    patch_open(llama, "all", [2], name="style", scale=1.0, seed=4)
    want = one_by_one(llama)
    with grun_fast.disable_adapters(llama, "forget"):
        only_style = one_by_one(llama)
        assert batched(llama) == only_style
    assert want != only_forget and want != only_style
    assert batched(llama) == want
    with torch.no_grad():  # transformers' generate(cache_implementation="paged") runs generate_batch too
        paged = llama.generate(torch.tensor([PROMPTS[1]]), generation_config=GREEDY, cache_implementation="paged",
                               continuous_batching_config=engine())
    assert paged[0, 0, len(PROMPTS[1]):].tolist() == want[1]


def test_requests_evicted_and_prefilled_again_are_edited_at_their_prompt_end(llama):
    """A cache of 12 four-token blocks cannot hold every request: the engine evicts some and prefills them
    again from prompt + generated tokens; the edit lands on the prompt's end, not on the longer prefill's."""
    patch_open(llama, "last_prompt", [1, 2])
    want = one_by_one(llama, new=20)
    log = EditLog(llama)
    got = batched(llama, new=20, page_size=4, num_blocks=12, max_requests_per_batch=4)
    log.close()
    assert got == want
    assert set(log.edits) == set(prompt_ends())
    assert sum(log.edits.values()) > len(PROMPTS)  # some prompt ends were prefilled (and edited) again


def test_mask_adapters_are_refused_and_unpatch_restores_the_engine(llama):
    base = batched(llama)
    patch_open(llama, "mask", [1, 2])
    for call in (lambda: llama.generate_batch(inputs=PROMPTS, generation_config=GREEDY,
                                              continuous_batching_config=engine()),
                 lambda: llama.init_continuous_batching(generation_config=GREEDY)):
        with pytest.raises(GRUNError, match="positions='mask': continuous batching"):
            call()
    assert llama.config._attn_implementation == "eager"  # refused before the manager switched it
    with grun_fast.disable_adapters(llama):  # a switched-off mask adapter is not in the way
        assert batched(llama) == base
    grun_fast.unpatch(llama)
    assert "init_continuous_batching" not in vars(llama) and "generate_batch" not in vars(llama)
    assert batched(llama) == base


def test_compiled_steps_are_refused_for_last_prompt_adapters(llama):
    patch_open(llama, "last_prompt", [1])
    with pytest.raises(GRUNError, match="torch.compile.*use_cuda_graph=False"):
        llama.init_continuous_batching(generation_config=GREEDY,
                                       continuous_batching_config=engine(default_compile_level=1))
    assert llama.config._attn_implementation == "eager"  # the refused manager's switch is undone


def test_persistent_manager_does_not_share_prefix_blocks(llama):
    """The engine reuses cached blocks by token ids alone: a follow-up prompt that extends an earlier request's
    prompt and answer would read that request's edited last prompt token. With adapters patched it is off, and
    the follow-up gets generate's log-probabilities."""
    patch_open(llama, "last_prompt", [1, 2], scale=2.0)
    first = PROMPTS[1] + PROMPTS[3]
    config = engine(page_size=4, return_logprobs=True)
    try:
        out = llama.generate_batch(inputs=[first], generation_config=GREEDY, continuous_batching_config=config,
                                   persistent_manager=True)
        follow_up = first + out["req_0"].generated_tokens + [11, 12, 13]
        out = llama.generate_batch(inputs=[follow_up], generation_config=GREEDY, continuous_batching_config=config,
                                   persistent_manager=True)
        cache = llama._cached_continuous_batching_manager.batch_processor.cache
        assert not cache.use_prefix_sharing and not cache.allow_block_sharing
    finally:
        llama.destroy_cached_continuous_batching_manager()
    with torch.no_grad():
        ref = llama.generate(torch.tensor([follow_up]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    want = torch.stack([s[0].log_softmax(-1)[t] for s, t in zip(ref.scores, ref.sequences[0, len(follow_up):])])
    assert out["req_1"].generated_tokens == ref.sequences[0, len(follow_up):].tolist()
    torch.testing.assert_close(torch.tensor(out["req_1"].logprobs), want, rtol=0, atol=2e-5)


def test_a_manager_made_before_patching_fails_loudly(llama):
    """Its steps carry no prompt ends: the requests fail with a GRUNError's message, never unedited."""
    manager = llama.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=engine())
    patch_open(llama, "all", [1])
    manager.start()
    try:
        manager.add_request(PROMPTS[0], request_id="r", max_new_tokens=2)
        result = manager.get_result(request_id="r", timeout=30)
    finally:
        manager.stop(block=True, timeout=10)
    assert result is not None and "made before grun_fast.patch" in (result.error or "")


def test_per_request_adapters_in_one_batch(llama):
    """route(manager, id, names) applies only those adapters to that request, in the same steps as requests with
    other stacks (base, one adapter, both): each gets the tokens generate gives with just its adapters on."""
    from grun_fast.continuous_batching import release, route

    patch_open(llama, "last_prompt", [1], name="forget")
    patch_open(llama, "all", [2], name="style", scale=1.0, seed=4)
    stacks = [(), ("forget",), ("style",), ("forget", "style"), (), ("forget",)]
    want = []
    for prompt, stack in zip(PROMPTS, stacks):
        with grun_fast.disable_adapters(llama, [n for n in ("forget", "style") if n not in stack]):
            want.append(one_by_one(llama, [prompt])[0])
    assert len({tuple(w) for w in want[:4]}) == 4  # every stack changes the tokens of its prompt
    manager = llama.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=engine())
    with pytest.raises(GRUNError, match="no adapter named 'nope'"):
        route(manager, "x", ["nope"])
    manager.start()
    try:
        for i, (prompt, stack) in enumerate(zip(PROMPTS, stacks)):
            route(manager, f"r{i}", stack)
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=NEW, eos_token_id=-1)
        got = {}
        while len(got) < len(PROMPTS):
            result = manager.get_result(timeout=30)
            assert result is not None and result.error is None
            got[result.request_id] = result.generated_tokens
            release(manager, result.request_id)
    finally:
        manager.stop(block=True, timeout=10)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    assert manager._grun_routes == {}


def test_per_request_adapters_are_refused_under_compiled_steps(llama):
    """An `all` adapter may run under compiled steps, but not chosen per request: a replayed step keeps the
    columns it was captured with."""
    from grun_fast.continuous_batching import route

    patch_open(llama, "all", [1])
    manager = llama.init_continuous_batching(generation_config=GREEDY,
                                             continuous_batching_config=engine(default_compile_level=1))
    with pytest.raises(GRUNError, match="per-request adapters.*torch.compile"):
        route(manager, "r", [])
