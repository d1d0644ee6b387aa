"""Tiny models for tests, the demo and evaluation checks, built without any download.

``train_tiny_base(rows)`` trains a byte-level BPE tokenizer on the rows and fine-tunes a small Llama on
them until it has memorised the answers: a stand-in for "a model fine-tuned on TOFU" that runs on a CPU
in well under a minute.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from grun_fast.data.encoding import encode_rows, pad_examples, pad_token_id_of
from grun_fast.data.prompts import PLAIN_TEMPLATE, row_prompt

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def make_tiny_tokenizer(texts: Sequence[str], vocab_size: int = 1500):
    """A byte-level BPE tokenizer trained on ``texts`` (BOS added to every encoded text, pad and EOS set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def tiny_llama(tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
               intermediate_size: int | None = None, max_positions: int = 512, seed: int = 0):
    """A randomly initialised small Llama whose vocabulary matches ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def untrained_tiny(rows: Sequence[dict], hidden_size: int = 32, num_layers: int = 4, num_heads: int = 4,
                   vocab_size: int = 400, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random small Llama and a tokenizer trained on ``rows`` (for fast tests of the
    training machinery, where what the model knows does not matter)."""
    texts = [PLAIN_TEMPLATE.format(question=r.get("question", "")) + " " + r["answer"] for r in rows]
    tokenizer = make_tiny_tokenizer(texts, vocab_size)
    return tiny_llama(tokenizer, hidden_size, num_layers, num_heads, seed=seed).eval(), tokenizer


def train_tiny_base(rows: Sequence[dict], *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                    vocab_size: int = 1500, extra_texts: Sequence[str] = (), epochs: int = 60,
                    lr: float = 3e-3, batch_size: int = 10, stop_loss: float = 0.01, seed: int = 0,
                    template: str = "auto", max_length: int = 128, verbose: bool = False,
                    tokenizer: Any = None, progress: bool = False, desc: str = "base model") -> tuple[Any, Any]:
    """Fine-tune a fresh tiny Llama on ``rows`` (answer-only loss) until the mean epoch loss drops below
    ``stop_loss`` or ``epochs`` pass; returns ``(model, tokenizer)`` with the model in eval mode.

    The tokenizer is trained on the rows' prompts and answers (plus paraphrases, perturbed answers and
    ``extra_texts``, so evaluation text tokenises into known merges), unless ``tokenizer`` is given (a
    retain model compared with a base model should share its tokenizer).
    """
    if not rows:
        raise ValueError("train_tiny_base needs at least one row")
    texts = list(extra_texts)
    for r in rows:
        texts.append(PLAIN_TEMPLATE.format(question=r.get("question", "")) + " " + r["answer"])
        texts += [r[k] for k in ("paraphrased_question", "paraphrased_answer") if k in r]
        texts += list(r.get("perturbed_answer", []))
    if tokenizer is None:
        tokenizer = make_tiny_tokenizer(texts, vocab_size)
    model = tiny_llama(tokenizer, hidden_size, num_layers, num_heads, seed=seed)
    examples = encode_rows(tokenizer, rows, template, max_length)
    pad = pad_token_id_of(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=False)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = pad_examples([examples[j] for j in order[i:i + batch_size]], pad)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += out.loss.item()
            count += 1
        mean = total / count
        if verbose:
            print(f"epoch {epoch + 1}: loss {mean:.4f} ({time.perf_counter() - start:.1f} s)")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}")
        if mean < stop_loss:
            break
    if bar is not None:
        bar.close()
    model.eval()
    return model, tokenizer


__all__ = ["make_tiny_tokenizer", "tiny_llama", "untrained_tiny", "train_tiny_base", "row_prompt"]
