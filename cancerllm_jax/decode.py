"""Batched generation: one jitted prefill + ``lax.while_loop`` decode over a static-shape KV cache.

Prompts are left-padded into a bucketed length (so a run compiles a handful of times, not once per prompt);
each row keeps its own positions (0 at its first real token), so a batch of ragged prompts gives the same tokens
as each prompt alone. Rows stop independently at EOS; the loop ends when every row is done or the budget is
spent, without returning to the host. The sliding window is applied by the attention mask, so sequences that
outgrow it stay exact.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cancerllm_jax.errors import UserError


def bucket_length(n: int, minimum: int = 16) -> int:
    """Next power of two up to 512, then the next multiple of 256."""
    n = max(n, minimum)
    if n <= 512:
        return 1 << (n - 1).bit_length()
    return -(-n // 256) * 256


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k: int, top_p, greedy: bool) -> jax.Array:
    """Next token per row: argmax when ``greedy``; else temperature, then top-k, then nucleus (top-p) sampling."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # always keeps the top candidate
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def generated_text(tokenizer, ids: Sequence[int], eos_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """Generated ids as text: EOS ids dropped, then cut at the first occurrence of each ``stop`` string in turn."""
    eos = set(eos_ids)
    text = tokenizer.decode([t for t in ids if t not in eos])
    for s in stop:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


class Decoder:
    """Compiles and caches generate functions per (batch, prompt bucket, budget, sampling mode)."""

    def __init__(self, lm, unstack: bool | str = "auto"):
        self.lm = lm
        # Per-layer weight arrays for the decode loop: XLA on a GPU copies each layer's slice of the stacked
        # weights on every decode step (measured: 56 % of a batch-1 7B step). The copy made once per generate
        # call costs the weights' size in memory, so "auto" does it on a GPU where they are <= 1/4 of its memory.
        self.unstack = should_unstack(lm) if unstack == "auto" else bool(unstack)
        self._fns: dict = {}
        self.last_stats: dict = {}

    def _fn(self, batch: int, prompt_len: int, max_new: int, greedy: bool, top_k: int, eos_ids: tuple):
        key = (batch, prompt_len, max_new, greedy, top_k, eos_ids)
        if key not in self._fns:
            from cancerllm_jax import sharding

            lm = self.lm
            fn = partial(_generate, lm.graphdef, max_new=max_new, greedy=greedy, top_k=top_k, eos_ids=eos_ids,
                         pad_id=0, cache_len=prompt_len + max_new, unstack=self.unstack)
            bs = sharding.batch_sharding(lm.mesh)
            rep = sharding.replicated(lm.mesh)
            state_sh = jax.tree.map(lambda x: x.sharding, lm.state)
            rows = jax.sharding.NamedSharding(lm.mesh, jax.sharding.PartitionSpec("data"))
            self._fns[key] = jax.jit(fn, in_shardings=(state_sh, bs, bs, bs, rep, rep, rep),
                                     out_shardings=(bs, rows))
        return self._fns[key]

    def generate(self, prompts: Sequence, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None, eos_id=None,
                 max_prompt_tokens: int | None = None, batch_size: int = 32, progress: bool = False):
        """Generate for every prompt (strings → strings; id lists → generated id lists incl. a final EOS)."""
        lm = self.lm
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise UserError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            return []
        as_text = isinstance(prompts[0], str)
        if as_text and lm.tokenizer is None:
            raise UserError(f"{lm.source}: no tokenizer found; pass token-id lists or load(..., tokenizer=...)")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = [self._encode(p, as_text, i) for i, p in enumerate(prompts)]
        truncated = 0
        if max_prompt_tokens:
            for i, p in enumerate(ids):
                if len(p) > max_prompt_tokens:
                    ids[i] = p[-max_prompt_tokens:]
                    truncated += 1
        if eos_id is None:
            eos_id = list(lm.eos_ids)
        eos_ids = tuple(sorted({int(e) for e in (eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])
                                if e is not None and e >= 0}))
        greedy = temperature is None or float(temperature) <= 0.0
        d = lm.mesh.shape["data"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        results: list = [None] * len(ids)
        key = jax.random.PRNGKey(seed)
        t0, generated = time.perf_counter(), 0
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        iterator = chunks
        if progress:
            from tqdm import tqdm

            iterator = tqdm(chunks, unit="batch", desc="generate")
        for c, chunk in enumerate(iterator):
            rows = [ids[i] for i in chunk]
            plen = bucket_length(max(len(r) for r in rows))
            b = max(len(rows), 1)
            b = -(-(1 << (b - 1).bit_length()) // d) * d if len(rows) < batch_size else -(-b // d) * d
            tokens = np.zeros((b, plen), np.int32)
            segs = np.zeros((b, plen), np.int32)
            pos = np.zeros((b, plen), np.int32)
            for r, row in enumerate(rows):
                n = len(row)
                tokens[r, plen - n:] = row
                segs[r, plen - n:] = 1
                pos[r, plen - n:] = np.arange(n)
            fn = self._fn(b, plen, max_new_tokens, greedy, int(top_k or 0), eos_ids)
            out, lengths = fn(lm.state, tokens, pos, segs, jax.random.fold_in(key, c),
                              jnp.float32(temperature or 0.0), jnp.float32(top_p))
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(chunk):
                gen = out[r, :lengths[r]].tolist()
                generated += len(gen)
                results[i] = gen
        self.last_stats = {"prompts": len(ids), "prompt_tokens": int(sum(len(p) for p in ids)),
                           "generated_tokens": generated, "time_s": time.perf_counter() - t0,
                           "truncated_prompts": truncated}
        if not as_text:
            return results
        return [generated_text(lm.tokenizer, gen, eos_ids, stop or ()) for gen in results]

    def _encode(self, prompt, as_text: bool, index: int) -> list[int]:
        if as_text:
            if not isinstance(prompt, str):
                raise UserError(f"prompt {index}: expected a string like the first prompt, got {type(prompt).__name__}")
            return self.lm.tokenizer.encode(prompt, bos=True)
        try:
            row = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise UserError(f"prompt {index}: expected a list of token ids") from None
        if not row:
            raise UserError(f"prompt {index} is empty")
        if min(row) < 0 or max(row) >= self.lm.cfg.vocab_size:
            raise UserError(f"prompt {index}: token ids must be in [0, {self.lm.cfg.vocab_size})")
        return row


def should_unstack(lm) -> bool:
    """True on a GPU whose memory holds the layer weights four times over."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    limit = (dev.memory_stats() or {}).get("bytes_limit", 0)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm.model.layers)))
    return bool(limit) and 4 * layer_bytes <= limit


def _generate(graphdef, state, tokens, positions, segs, key, temperature, top_p, *, max_new: int, greedy: bool,
              top_k: int, eos_ids: tuple, pad_id: int, cache_len: int, unstack: bool = False):
    """Prefill the prompt block, then decode up to ``max_new`` tokens; returns ``(tokens [B, max_new], lengths)``."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    cache = model.init_cache(b, cache_len)
    layers = model.layer_list() if unstack else None
    # the prompt block attends over itself (the cache is empty); the head runs at the last slot only
    logits, cache = model(tokens, positions, segs, cache=cache, last_only=True, prefill=True, layers=layers)
    last = logits[:, -1]
    next_pos = positions[:, -1] + 1
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, last, cache, done, out, lengths = carry
        tok = sample_logits(last, jax.random.fold_in(key, i), temperature, top_k, top_p, greedy)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        logits, cache = model(tok[:, None], (next_pos + i)[:, None], jnp.ones((b, 1), jnp.int32), cache=cache,
                              layers=layers)
        return i + 1, logits[:, -1], cache, done, out, lengths

    padding_rows = jnp.sum(segs, axis=1) == 0  # rows added to fill the batch bucket: done from the start
    init = (jnp.int32(0), last, cache, padding_rows, jnp.full((b, max_new), pad_id, jnp.int32),
            jnp.zeros((b,), jnp.int32))
    _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, init)
    return out, lengths
