"""The lower-layer cache of training: a stored value depends on its example only, never on the batch it was
first met in (a resumed run refills the store in other batches and must train the same adapter)."""
import torch

from grun_fast.data import make_authors
from grun_fast.testing import untrained_tiny
from grun_fast.unlearn.cache import LowerLayerCache


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_cached_values_do_not_depend_on_batch_composition():
    rows = make_authors(3, 6, seed=2)
    model, tok = untrained_tiny(rows, hidden_size=64, num_layers=4, seed=0)
    tok.padding_side = "right"
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    long_text = " ".join(texts[:6])                       # pads the others in its batch by many tokens
    target = texts[7]

    alone = LowerLayerCache(model, skip=2, max_bytes=2**30)
    ids, mask = _batch(tok, [target])
    value_alone = alone.fetch([("f", 7)], ids, mask)[0, : int(mask.sum())]

    crowded = LowerLayerCache(model, skip=2, max_bytes=2**30)
    ids, mask = _batch(tok, [long_text, texts[3], target, texts[1] + " " + texts[2]])
    keys = [("r", 0), ("f", 3), ("f", 7), ("r", 1)]
    out = crowded.fetch(keys, ids, mask)
    assert torch.equal(crowded.store[("f", 7)], value_alone)           # bitwise, not close
    assert torch.equal(out[2, : value_alone.shape[0]], value_alone)
    assert torch.count_nonzero(out[2, value_alone.shape[0]:]) == 0     # zeros on its padding
    again = crowded.fetch(keys, ids, mask)                             # the second epoch reads the store
    assert torch.equal(again, out) and crowded.hits == 4 and crowded.misses == 4
