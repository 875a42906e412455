"""Batched generation: a jitted prefill, then a jitted ``lax.while_loop`` decode over a static-shape KV cache.

Prompts are left-padded into a bucketed length (so a run compiles a handful of times, not once per prompt: the
compiled shapes are keyed on the prompt-length bucket, the batch rows, ``max_new_tokens``, ``top_k``, the EOS ids
and greedy vs sampling; ``temperature``, ``top_p`` and ``seed`` are traced, so changing them compiles nothing); each
row keeps its own positions (0 at its first real token), so a batch of ragged prompts gives the same tokens as each
prompt alone. A prefix every prompt of a batch shares is prefilled once; rows of spread lengths are prefilled in
length groups. Rows stop independently at EOS; the loop ends when every row is done or the budget is spent, without
returning to the host. The sliding window is applied by the attention mask, so sequences that outgrow it stay exact."""
from __future__ import annotations

import functools
import logging
import os
import time
from functools import cache, partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cancerllm_jax.data.tokenizer import encode_written_prompt
from cancerllm_jax.errors import UserError
from cancerllm_jax.sharding import device_memory_bytes


def bucket_length(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a multiple of 16 and of a quarter of its power of two (..., 64, 80, 96, 112, 128, 160,
    ..., 512, 640, ...): at most 25 % padding, four compiled shapes per doubling of the prompt length."""
    n = max(n, minimum)
    step = max(16, 1 << max((n - 1).bit_length() - 3, 0))
    return -(-n // step) * step


log = logging.getLogger(__name__)
SHARED_PREFIX_STEP = 16
PREFILL_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # Eigen dots for the prompt block on XLA:CPU


def shared_prefix_length(rows: Sequence[Sequence[int]], step: int = SHARED_PREFIX_STEP) -> int:
    """How many leading tokens every row shares, rounded down to a multiple of ``step`` (so the compiled shapes
    stay few) and leaving each row at least one token of its own; 0 for a single row or no common prefix.

    A batch of evaluation prompts shares the Alpaca preamble and the task's instruction (the phenotype questions:
    51 of ~100 tokens): their keys and values are computed once and copied into every row's cache."""
    if len(rows) < 2:
        return 0
    n = min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1)
    return (n // step) * step


def sample_logits(logits: jax.Array, keys: jax.Array, temperature, top_k: int, drop_mass, greedy: bool) -> jax.Array:
    """Next token per row: argmax when ``greedy``; else a draw from ``warp_logits``'s filtered distribution, each
    row from its own key (``keys``: ``[B, 2]``), by Gumbel-max with the noise drawn in vocabulary order: a token's
    noise never depends on where the sort puts it, so logits that differ in the last bits (another batch shape)
    pick the same token unless two tokens really tie (noise tied to sort positions swapped between near-ties)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return first_argmax(logits)
    order, sorted_logits = _warp_sorted(logits, temperature, top_k, drop_mass)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
    choice = jnp.argmax(sorted_logits + jnp.take_along_axis(noise, order, axis=-1), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def nucleus_drop_mass(top_p: float) -> float:
    """``1 - top_p`` (in double, as transformers' ``TopPLogitsWarper`` compares with it), or -1 for ``top_p``
    >= 1: no filter, as transformers adds no warper then (a float32 sum reaches 1 before the tail's tokens)."""
    return 1.0 - top_p if top_p < 1.0 else -1.0


def warp_logits(logits: jax.Array, temperature, top_k: int, drop_mass) -> jax.Array:
    """transformers' warpers in their order: logits / ``temperature``, then top-k (every token tied with the
    k-th kept), then top-p (``drop_mass = nucleus_drop_mass(top_p)``); filtered tokens are -inf."""
    order, sorted_logits = _warp_sorted(logits.astype(jnp.float32), temperature, top_k, drop_mass)
    return jnp.zeros_like(sorted_logits).at[jnp.arange(order.shape[0])[:, None], order].set(sorted_logits)


def _warp_sorted(logits, temperature, top_k: int, drop_mass):
    """``(order, warped logits[order])``, ``order`` ascending (as ``TopPLogitsWarper``'s sort: it drops the
    candidates whose cumulative probability from the least likely up is <= ``drop_mass``, never the last)."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k > 0:  # k past the vocabulary keeps every token
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    drop = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= drop_mass
    return order, jnp.where(drop.at[:, -1].set(False), -jnp.inf, sorted_logits)


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (the first maximal index; int32) as a max and a min over a select: XLA:CPU's
    variadic arg-reduce took 12 of a batch-64 decode step's ~220 ms on SmolLM2's 49152-token vocabulary, this
    takes 5. A row with a NaN gives the last index."""
    v = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == best, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1)


def generated_text(tokenizer, ids: Sequence[int], eos_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """Generated ids as text: EOS ids dropped, then cut before the ``stop`` string that is complete first (where
    a stopper reading the text as it grows would stop), whatever order ``stop`` lists them in."""
    eos = set(eos_ids)
    ids = [t for t in ids if t not in eos]
    special = _special_stop_ids(tokenizer, tuple(stop))
    cut = next((j for j, t in enumerate(ids) if t in special), None)  # a special token's text never decodes
    text = tokenizer.decode(ids if cut is None else ids[:cut])
    found = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]  # (end, start) of each one's first match
    return text[:min(found)[1]] if found else text


@functools.lru_cache(maxsize=32)  # called for every generated row with the same tokenizer and stop strings
def _special_stop_ids(tokenizer, stop: tuple[str, ...]) -> frozenset[int]:
    """The ids of the ``stop`` strings that are one special token's text (``<|im_end|>``): decoded text drops special
    tokens, so these are found among the ids (transformers' stop_strings finds them in its token strings)."""
    from cancerllm_jax.data.tokenizer import encode_written_prompt

    out: set[int] = set()
    if not stop or not hasattr(tokenizer, "encode"):
        return frozenset()
    for s in stop:
        ids = encode_written_prompt(tokenizer, s, bos=False)
        # one token read as a special token only (as plain text it is other tokens), and it has no decoded text
        if len(ids) == 1 and tokenizer.encode(s) != ids and not tokenizer.decode(ids):
            out.add(ids[0])
    return frozenset(out)


def _row_keys(seed, n: int) -> np.ndarray:
    """One sampling key per prompt (``[n, 2]`` uint32): ``seed`` an int → prompt ``i`` draws from
    ``fold_in(PRNGKey(seed), i)``; a list of ints → prompt ``i`` from ``PRNGKey(seed[i] mod 2**32)``. A prompt's
    samples therefore never depend on the batch size or on the other prompts of its batch."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):  # any size: taken mod 2**64
        return np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(_key64(int(seed)), jnp.arange(n, dtype=jnp.uint32)))
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else None
    if seeds is None or len(seeds) != n or any(isinstance(x, bool) or not isinstance(x, (int, np.integer))
                                                for x in seeds):
        raise UserError(f"seed must be an int or a list of one int per prompt ({n}), got {seed!r}")
    return np.asarray(jax.vmap(jax.random.PRNGKey)(jnp.asarray([int(x) % 2**32 for x in seeds], jnp.uint32)))


def _key64(n: int) -> jax.Array:
    """The raw threefry key of ``n`` mod 2**64 (``[high, low]`` uint32 words): what ``PRNGKey(n)`` gives with x64
    on. With x64 off ``PRNGKey`` drops the high word, so seeds 0 and 2**32 would sample alike."""
    n %= 2**64
    return jnp.asarray([n >> 32, n & 0xFFFFFFFF], jnp.uint32)


def _check_counts(**counts) -> None:
    """``max_new_tokens`` and ``batch_size`` whole numbers >= 1; ``top_k`` and ``max_prompt_tokens`` >= 0 (0: off;
    ``max_prompt_tokens`` None too)."""
    for name, value in counts.items():
        if name == "max_prompt_tokens" and value is None:  # no limit
            continue
        least = 0 if name in ("top_k", "max_prompt_tokens") else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise UserError(f"{name} must be a whole number >= {least}, got {value!r}")


def _real(name: str, value) -> float:
    """``value`` as a float; a string, a bool or anything not a real number is an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number, got {value!r}")
    return float(value)


def cut_prompt(ids: list[int], max_prompt_tokens: int, bos: int | None) -> list[int]:
    """A prompt longer than ``max_prompt_tokens``: its last tokens, after the BOS it starts with (if any)."""
    if len(ids) <= max_prompt_tokens:
        return list(ids)
    keep_bos = bos is not None and ids[0] == bos and max_prompt_tokens > 1
    return list(ids[:1]) + list(ids[len(ids) - max_prompt_tokens + 1:]) if keep_bos else list(ids[-max_prompt_tokens:])


class Decoder:
    """Compiles and caches the prefill, decode-loop and cache-join functions per shape and sampling mode."""

    def __init__(self, lm, unstack: bool | str = "auto", share_prefix: bool | str = "auto"):
        self.lm = lm
        # A prefix every prompt of a batch shares is prefilled once (batch 1) and copied into each row's cache;
        # the rows' own tokens then attend over it through the cache. "auto": where attention runs as the
        # explicit-mask einsum (the fused cuDNN kernel has no cache path).
        self.share_prefix = (lm.model.attention_impl() == "xla") if share_prefix == "auto" else bool(share_prefix)
        # Per-layer weight arrays (and KV caches) for the decode loop: XLA copies each layer's slice of a stacked
        # array on every decode step (a GPU: 56 % of a batch-1 7B step; the 2-core CPU: ~20 % of a batch-64
        # SmolLM2 step). The copy, made once, costs the weights' size in memory, so "auto" makes it where the layer
        # weights are <= 1/4 of the device's memory (a GPU's, else the host's RAM).
        self.unstack = should_unstack(lm) if unstack == "auto" else bool(unstack)
        # Per-layer caches cost one more cache at the loop's start (the stacked prefill cache is split): on the
        # host's RAM that is cheap; a GPU keeps the stacked cache and updates it in place.
        self.split_cache = jax.default_backend() == "cpu"
        self._layers = None
        # XLA:CPU: the prompt block's large GEMMs run faster as Eigen dots than in YNNPACK fusions, the decode
        # step's small ones (M = batch) slower; the two are compiled apart (measured in docs/benchmarks.md).
        self.prefill_options = cpu_prefill_options() if jax.default_backend() == "cpu" else {}
        self._fns: dict = {}
        self._warned_positions = False
        self._warned_greedy = False
        self.last_stats: dict = {}

    def layers(self):
        """The per-layer weights (``Mistral.layer_list``) when ``unstack``, else None; made once."""
        if self.unstack and self._layers is None:
            lm = self.lm
            self._layers = jax.jit(lambda state: nnx.merge(lm.graphdef, state).layer_list())(lm.state)
        return self._layers if self.unstack else None

    # One jitted function per shape (not only per static argument), so that ``len(_fns)`` counts compilations
    # (the evaluation runner reports which batches compiled).
    def _prefill_fn(self, prefix_len: int, cache_len: int, rows: int, length: int):
        key = ("prefill", prefix_len, cache_len, rows, length)
        if key not in self._fns:
            fn = partial(_prefill, self.lm.graphdef, cache_len=cache_len)
            self._fns[key] = jax.jit(fn, compiler_options=self.prefill_options or None)
        return self._fns[key]

    def _decode_fn(self, max_new: int, greedy: bool, top_k: int, eos_ids: tuple, rows: int, cache_len: int):
        key = ("decode", max_new, greedy, top_k, eos_ids, rows, cache_len)
        if key not in self._fns:
            split = self.unstack and self.split_cache
            fn = partial(_decode, self.lm.graphdef, max_new=max_new, greedy=greedy, top_k=top_k, eos_ids=eos_ids,
                         pad_id=0, split_cache=split)
            # a stacked cache is donated and returned, so the loop updates the prefill's cache in place
            self._fns[key] = jax.jit(fn, donate_argnums=() if split else (3,))
        return self._fns[key]

    def generate(self, prompts: Sequence, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None, eos_id=None,
                 max_prompt_tokens: int | None = None, batch_size: int = 32, progress: bool = False,
                 add_bos: bool = True):
        """Generate for every prompt (strings → strings; id lists → generated id lists incl. a final EOS).

        A string prompt is encoded as ``[bos] + prompt`` when the tokenizer starts text with a BOS (Mistral,
        Llama; not GPT-2-style tokenizers such as SmolLM2's), i.e. as ``tokenizer(text)`` and the instruction
        pipeline's training examples; ``add_bos=False`` feeds the text's ids alone, as
        ``tokenizer(text, add_special_tokens=False)`` would. Id-list prompts are used as given.
        ``max_prompt_tokens``: a longer prompt keeps its BOS (when it starts with one) and its last tokens; such
        prompts are counted in ``last_stats["truncated_prompts"]``.
        ``stop`` (a string or a list; string prompts only) cuts each decoded text before the stop string that is
        complete first (``generated_text``); the rows still decode to EOS or ``max_new_tokens``. Sampling
        (``temperature`` > 0, then ``top_k``, then ``top_p``, as transformers' warpers; ``top_k`` 0 is off, where
        transformers' sampling default is 50: pass ``top_k=50`` to match it) gives each prompt its own
        random stream: ``seed`` an int → from the seed and the prompt's index in ``prompts``; a list of ints → one
        seed per prompt. A prompt's random numbers never depend on ``batch_size`` or on which prompts share its batch
        (its logits may still differ in the last bits between batch shapes, which can tip a near-tie)."""
        lm = self.lm
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise UserError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            return []
        as_text = isinstance(prompts[0], str)
        if as_text and lm.tokenizer is None:
            raise UserError(f"{lm.source}: no tokenizer found; pass token-id lists or load(..., tokenizer=...)")
        if stop is not None and not isinstance(stop, (str, list, tuple)):
            raise UserError(f"stop must be a non-empty string or a list of them, got {type(stop).__name__}")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if stop and not as_text:
            raise UserError("stop strings apply to string prompts; with token-id prompts, stop with eos_id")
        if any(not isinstance(x, str) or not x for x in stop):
            raise UserError("stop must be a non-empty string or a list of them")
        top_k = 0 if top_k is None else top_k
        _check_counts(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                      top_k=top_k)
        top_p = 1.0 if top_p is None else _real("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        temperature = 0.0 if temperature is None else _real("temperature", temperature)
        if not (np.isfinite(temperature) and temperature >= 0.0):  # as the CLI: a negative one is not "greedy"
            raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        if not isinstance(add_bos, (bool, np.bool_)):
            raise UserError(f"add_bos must be True or False, got {add_bos!r}")
        unused = [f"{k}={v:g}" for k, v, off in (("top_k", top_k, 0), ("top_p", top_p, 1.0)) if v != off]
        if temperature == 0.0 and unused and not self._warned_greedy:  # as transformers, when do_sample is off
            self._warned_greedy = True  # once per decoder: generate.py and evaluate.py call it batch by batch
            log.warning("%s apply only when sampling (temperature > 0): decoding greedily", ", ".join(unused))
        ids = [self._encode(p, as_text, i, add_bos) for i, p in enumerate(prompts)]
        truncated = 0
        if max_prompt_tokens:
            for i, p in enumerate(ids):
                if len(p) > max_prompt_tokens:
                    ids[i] = cut_prompt(p, max_prompt_tokens, lm.cfg.bos_token_id)
                    truncated += 1
        # None: the model's EOS ids; [] (or only negative ids): no EOS, every row runs to max_new_tokens
        given = [e for e in np.asarray(lm.eos_ids if eos_id is None else eos_id, dtype=object).ravel() if e is not None]
        if any(isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, np.integer)) for e in given):
            raise UserError(f"eos_id must be a token id or a list of them, got {eos_id!r}")
        past = [int(e) for e in given if e >= lm.cfg.vocab_size]
        if past:  # no row could ever stop on it (and past int32 it would not fit the decode loop's array)
            raise UserError(f"eos_id {past[0]} is not a token id of this model (vocabulary {lm.cfg.vocab_size}); "
                            "negative ids mean no EOS")
        eos_ids = tuple(sorted({int(e) for e in given if e >= 0}))
        greedy = temperature <= 0.0
        top_k = min(int(top_k), lm.cfg.vocab_size)  # as transformers: k past the vocabulary keeps every token
        d = lm.mesh.shape["data"]
        rows_sh = jax.sharding.NamedSharding(lm.mesh, jax.sharding.PartitionSpec("data"))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        results: list = [None] * len(ids)
        row_keys = _row_keys(seed, len(ids))
        t0, generated = time.perf_counter(), 0
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        iterator = chunks
        if progress:
            from tqdm import tqdm

            iterator = tqdm(chunks, unit="batch", desc="generate")
        for c, chunk in enumerate(iterator):
            rows = [ids[i] for i in chunk]
            shared = shared_prefix_length(rows) if self.share_prefix else 0
            b = len(rows)  # a last, smaller batch: a power of two rows, never more than batch_size
            b = -(-(b if b == batch_size else min(1 << (b - 1).bit_length(), batch_size)) // d) * d
            last, cache = self._prefill_rows(rows, b, shared, max_new_tokens)
            next_pos = jax.device_put(np.asarray([len(r) for r in rows] + [0] * (b - len(rows)), np.int32), rows_sh)
            filler = jax.device_put(np.arange(b) >= len(rows), rows_sh)  # rows that only fill the batch: done at once
            decode = self._decode_fn(max_new_tokens, greedy, top_k, eos_ids, b, cache["pos"].shape[1])
            keys = np.concatenate([row_keys[chunk], np.zeros((b - len(rows), 2), np.uint32)])  # fillers: any key
            out, lengths, _ = decode(lm.state, self.layers(), last, cache, next_pos, filler,
                                     jax.device_put(keys, rows_sh), jnp.float32(temperature),
                                     jnp.float32(nucleus_drop_mass(top_p)))
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
        return [generated_text(lm.tokenizer, gen, eos_ids, stop) for gen in results]

    def _prefill_rows(self, rows: list, b: int, shared: int, max_new: int):
        """The rows' prompts (``shared`` leading tokens common to all) into a cache with room for the ``max_new - 1``
        generated tokens fed back, as a batch of ``b`` rows (rows past ``len(rows)`` are padding); returns
        ``(last logits, cache)``.

        Rows come longest first; where their lengths spread, groups of rows are prefilled apart, each padded to
        its own bucket, and their caches joined (a group's unused slots stay empty and masked)."""
        from cancerllm_jax import sharding

        lm = self.lm
        bs, rep = sharding.batch_sharding(lm.mesh), sharding.replicated(lm.mesh)
        own = [len(r) - shared for r in rows] + [1] * (b - len(rows))
        groups = prefill_groups(own, lm.mesh.shape["data"])
        plen = max(t for _, _, t in groups)
        cache_len = shared + plen + max_new - 1  # the last token is sampled, never fed back
        self._check_cache_fits(b, cache_len, max_new)
        self._warn_past_max_positions(max(len(r) for r in rows) + max_new - 1)
        prefix = jax.device_put(np.asarray(rows[0][:shared], np.int32), rep)
        lasts, caches = [], []
        for start, end, t in groups:
            tokens, segs, pos = (np.zeros((end - start, t), np.int32) for _ in range(3))
            for r, row in enumerate(rows[start:end]):
                n = len(row) - shared
                tokens[r, t - n:] = row[shared:]
                segs[r, t - n:] = 1
                pos[r, t - n:] = np.arange(shared, len(row))
            fn = self._prefill_fn(shared, cache_len if len(groups) == 1 else shared + t, end - start, t)
            last, cache = fn(lm.state, prefix, *(jax.device_put(x, bs) for x in (tokens, pos, segs)))
            lasts.append(last)
            caches.append(cache)
        if len(groups) == 1:
            return lasts[0], caches[0]
        key = ("join", cache_len, shared, tuple(groups))
        if key not in self._fns:
            self._fns[key] = jax.jit(partial(_join_caches, cache_len=cache_len, filled=shared + plen))
        return jnp.concatenate(lasts), self._fns[key](caches)

    def _warn_past_max_positions(self, positions: int) -> None:
        """Once per decoder: rows that feed more positions than the model's ``max_position_embeddings`` (RoPE goes
        on, as in transformers, which is silent about it)."""
        limit = self.lm.cfg.max_position_embeddings
        if positions > limit and not self._warned_positions:
            self._warned_positions = True
            log.warning("prompt + new tokens use %d positions, past the model's max_position_embeddings (%d): "
                        "positions it was not trained for (lower the prompt-token limit: generate.py "
                        "--max-prompt-tokens, evaluate.py --max-input-tokens, max_prompt_tokens=; or the new tokens)",
                        positions, limit)

    def _check_cache_fits(self, b: int, cache_len: int, max_new: int) -> None:
        """A KV cache that cannot fit in the device's memory (or past int32 positions) is refused before it is
        made: an over-large ``max_new_tokens`` would otherwise end in an out-of-memory kill with no message."""
        cfg = self.lm.cfg
        if cache_len >= 2**31:
            raise UserError(f"max_new_tokens={max_new}: prompt + new tokens ({cache_len}) must be < 2**31")
        slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(self.lm.model.compute_dtype).itemsize
        copies = 2 if self.unstack and self.split_cache else 1  # the split loop holds the stacked cache too
        need = (copies * slot * cache_len + 8 * max_new) * b / self.lm.mesh.size  # + the int32 tokens, twice
        limit = device_memory_bytes(self.lm.mesh)
        if limit and need > limit:
            raise UserError(f"max_new_tokens={max_new}: a batch of {b} rows needs a KV cache of {need / 2**30:.1f} "
                            f"GiB per device ({cache_len} slots a row), more than the device's "
                            f"{limit / 2**30:.1f} GiB; lower max_new_tokens or batch_size")

    def _encode(self, prompt, as_text: bool, index: int, add_bos: bool = True) -> list[int]:
        if as_text:
            if not isinstance(prompt, str):
                raise UserError(f"prompt {index}: expected a string like the first prompt, got {type(prompt).__name__}")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"prompt {index}: a lone UTF-16 surrogate ({prompt[e.start]!a}) at character "
                                f"{e.start}, which is no character; fix the text") from None
            row = encode_written_prompt(self.lm.tokenizer, prompt, add_bos)  # as tokenizer(text)
            if not prompt or not row:  # a BOS alone is no prompt either
                raise UserError(f"prompt {index} is empty (no tokens)")
            return row
        if isinstance(prompt, (bytes, bytearray, memoryview)):  # its items are ints: read as ids, silently
            raise UserError(f"prompt {index}: {type(prompt).__name__}, not a string or token ids; decode it to str")
        try:
            row = [int(t) for t in prompt]
            if any(isinstance(t, (bool, np.bool_)) or t != r for t, r in zip(prompt, row)):  # 1.5, "7", True
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"prompt {index}: expected a list of token ids (whole numbers)") from None
        if not row:
            raise UserError(f"prompt {index} is empty")
        if min(row) < 0 or max(row) >= self.lm.cfg.vocab_size:
            raise UserError(f"prompt {index}: token ids must be in [0, {self.lm.cfg.vocab_size})")
        return row


@cache
def cpu_prefill_options() -> dict:
    """``PREFILL_CPU_OPTIONS`` if this jaxlib's XLA:CPU takes them (the flag is experimental), else none."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=PREFILL_CPU_OPTIONS).lower(1.0).compile()
    except Exception:  # an unknown flag: compile as usual rather than fail every prefill
        return {}
    return dict(PREFILL_CPU_OPTIONS)


def prefill_groups(lengths: Sequence[int], data: int = 1, min_rows: int = 8) -> list[tuple[int, int, int]]:
    """``(start, end, bucket)`` row groups for a prefill of rows of ``lengths`` tokens (longest first): 1, 2 or 4
    equal groups (each a multiple of ``data`` rows and at least ``min_rows``), whichever pads least, split only
    when that saves at least 15 % of the padded tokens (each split costs a call and a join)."""
    b = len(lengths)

    def split(g):
        n = b // g
        return [(i * n, (i + 1) * n, bucket_length(max(lengths[i * n:(i + 1) * n]))) for i in range(g)]

    best = split(1)
    cost = sum((e - s) * t for s, e, t in best)
    for g in (2, 4):
        if b % g or (b // g) % data or b // g < min_rows:
            continue
        cand = split(g)
        c = sum((e - s) * t for s, e, t in cand)
        if c <= 0.85 * cost:
            best, cost = cand, c
    return best


def _join_caches(caches: list[dict], *, cache_len: int, filled: int) -> dict:
    """Row groups' caches (each filled to its own length) as one batch of ``cache_len`` slots, ``filled`` used."""
    def slots(x, axis, value=0):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, cache_len - x.shape[axis])
        return jnp.pad(x, pad, constant_values=value)

    return {"k": jnp.concatenate([slots(c["k"], 4) for c in caches], axis=1),
            "v": jnp.concatenate([slots(c["v"], 3) for c in caches], axis=1),
            "pos": jnp.concatenate([slots(c["pos"], 1, -1) for c in caches], axis=0),
            "index": jnp.asarray(filled, jnp.int32)}


def should_unstack(lm) -> bool:
    """True where the device's memory (a GPU's, else the host's RAM) holds the layer weights four times over."""
    limit = device_memory_bytes(lm.mesh)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm.model.layers)))
    return bool(limit) and 4 * layer_bytes <= limit


def _prefill(graphdef, state, prefix, tokens, positions, segs, *, cache_len: int):
    """The prompt into a fresh cache of ``cache_len`` slots: the rows' shared ``prefix [P]`` once, then their own
    left-padded ``tokens [B, T]``. Returns the last position's logits ``[B, V]`` and the cache.

    The layer scan over the stacked weights: with per-layer weights the prompt block is no faster (its GEMMs are
    large) and compiles 6x slower (SmolLM2 on the 2-core CPU: 7.3 s either way; compile 1.9 s vs 12.4 s)."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], cache_len)
    if prefix.shape[0]:
        cache = _with_shared_prefix(model, cache, prefix)
        logits, cache = model(tokens, positions, segs, cache=cache, last_only=True)
    else:  # the prompt block attends over itself (the cache is empty); the head runs at the last slot only
        logits, cache = model(tokens, positions, segs, cache=cache, last_only=True, prefill=True)
    return logits[:, -1], cache


def _decode(graphdef, state, layers, last, cache, next_pos, done, keys, temperature, drop_mass, *, max_new: int,
            greedy: bool, top_k: int, eos_ids: tuple, pad_id: int, split_cache: bool = False):
    """Up to ``max_new`` tokens after the prefill, in one ``while_loop`` that ends when every row is ``done``
    (rows that only fill the batch bucket start done); returns ``(tokens [B, max_new], lengths [B], cache)``.

    The first token comes from the prefill's logits, so ``max_new`` tokens take ``max_new - 1`` forward passes
    (as transformers' ``generate``): no pass runs for logits nobody samples."""
    model = nnx.merge(graphdef, state)
    b = last.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    if split_cache:  # per-layer caches beside per-layer weights
        cache = {**cache, "k": list(cache["k"]), "v": list(cache["v"])}

    def emit(i, logits, done, out, lengths):
        tok = sample_logits(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, i), temperature, top_k,
                            drop_mass, greedy)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.isin(tok, eos), out.at[:, i].set(tok), lengths + (~done).astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):  # token i from a forward pass over token i - 1
        i, tok, cache, done, out, lengths = carry
        logits, cache = model(tok[:, None], (next_pos + i - 1)[:, None], jnp.ones((b, 1), jnp.int32), cache=cache,
                              layers=layers)
        tok, done, out, lengths = emit(i, logits[:, -1], done, out, lengths)
        return i + 1, tok, cache, done, out, lengths

    tok, done, out, lengths = emit(0, last, done, jnp.full((b, max_new), pad_id, jnp.int32),
                                   jnp.zeros((b,), jnp.int32))
    _, _, cache, _, out, lengths = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, done, out, lengths))
    return out, lengths, (None if split_cache else cache)


def _with_shared_prefix(model, cache: dict, prefix) -> dict:
    """``cache`` with the prefix's keys and values (computed once, batch 1) in slots ``[0, P)`` of every row."""
    p = prefix.shape[0]
    _, one = model(prefix[None], cache=model.init_cache(1, p), last_only=True, prefill=True)
    b = cache["pos"].shape[0]
    k = jnp.broadcast_to(one["k"], (one["k"].shape[0], b, *one["k"].shape[2:]))
    v = jnp.broadcast_to(one["v"], (one["v"].shape[0], b, *one["v"].shape[2:]))
    return {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, 0, axis=4),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, 0, axis=3),
            "pos": cache["pos"].at[:, :p].set(jnp.arange(p, dtype=jnp.int32)),
            "index": jnp.asarray(p, jnp.int32)}
