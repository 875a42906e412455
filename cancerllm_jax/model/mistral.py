"""A Flax NNX Mistral / Llama decoder with optional PEFT-style LoRA on its projections.

Layer weights are stacked along a leading ``layers`` axis and the decoder runs them with ``jax.lax.scan``:
compile time does not grow with depth, and one remat policy covers every layer. Kernels are stored
``[in, out]`` (HF stores ``[out, in]``). Softmax, RMSNorm statistics and RoPE tables are computed in fp32, and a
float32 model's matrix products in full fp32 (not TF32) on every backend.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cancerllm_jax.config import LoRAConfig, ModelConfig, proj_shapes  # noqa: F401  (proj_shapes: imported from here)
from cancerllm_jax.errors import UserError

Array = jax.Array
NEG_INF = -1e30  # finite, so a fully masked (padding) row never produces NaN

# Logical axes of every parameter, keyed by its path inside the model (see sharding.py for the mesh rules).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "layers.attn_norm": ("layers", "norm"),
    "layers.mlp_norm": ("layers", "norm"),
    "layers.q.kernel": ("layers", "embed", "heads"),
    "layers.k.kernel": ("layers", "embed", "kv_heads"),
    "layers.v.kernel": ("layers", "embed", "kv_heads"),
    "layers.o.kernel": ("layers", "heads", "embed"),
    "layers.gate.kernel": ("layers", "embed", "mlp"),
    "layers.up.kernel": ("layers", "embed", "mlp"),
    "layers.down.kernel": ("layers", "mlp", "embed"),
}
for _name in ("q", "k", "v", "o", "gate", "up", "down"):
    _ax = PARAM_AXES[f"layers.{_name}.kernel"]
    PARAM_AXES[f"layers.{_name}.lora_a"] = ("layers", _ax[1], "lora_rank")
    PARAM_AXES[f"layers.{_name}.lora_b"] = ("layers", "lora_rank", _ax[2])

ATTENTION_IMPLS = ("auto", "xla", "cudnn")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Proj(nnx.Module):
    """A stacked bias-free linear ``[layers, in, out]``; LoRA factors ``A [layers, in, r]``, ``B [layers, r, out]``."""

    def __init__(self, layers: int, d_in: int, d_out: int, dtype, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (layers, d_in, d_out), jnp.float32)
                                .astype(dtype))
        if lora is not None:
            # PEFT: A ~ kaiming_uniform(a=sqrt(5)) on an [r, in] weight -> U(-1/sqrt(in), 1/sqrt(in)); B = 0.
            bound = 1.0 / np.sqrt(d_in)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (layers, d_in, lora.rank), jnp.float32,
                                                           -bound, bound))
            self.lora_b = nnx.LoRAParam(jnp.zeros((layers, lora.rank, d_out), jnp.float32))


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked along axis 0."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        n = cfg.num_layers
        self.attn_norm = nnx.Param(jnp.ones((n, cfg.hidden_size), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((n, cfg.hidden_size), dtype))
        for name, (d_in, d_out) in proj_shapes(cfg).items():
            target = lora if lora is not None and name in lora.targets else None
            setattr(self, name, Proj(n, d_in, d_out, dtype, rngs, target))


class Mistral(nnx.Module):
    """Decoder-only transformer: embeddings → N × (RMSNorm, GQA attention, RMSNorm, SwiGLU) → RMSNorm → LM head."""

    def __init__(self, cfg: ModelConfig, *, lora: LoRAConfig | None = None, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = jnp.float32, remat: str = "none", attention: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        rngs = rngs or nnx.Rngs(0)
        self.cfg, self.lora_cfg = cfg, lora
        self.compute_dtype, self.remat, self.attention = jnp.dtype(compute_dtype), remat, attention
        self.attention_impl()  # cuDNN where it cannot run: refused now, not at the first forward pass
        self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                                        jnp.float32).astype(param_dtype))
        self.layers = DecoderLayers(cfg, param_dtype, rngs, lora)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                                              jnp.float32).astype(param_dtype))

    # -- the forward pass ----------------------------------------------------------------------------------------
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None, *,
                 cache: dict | None = None, dropout_key: Array | None = None, return_hidden: bool = False,
                 last_only: bool = False, prefill: bool = False, layers: list[dict] | None = None):
        """Logits ``[B, T, V]`` (compute dtype) and the updated cache (or ``None``).

        ``last_only``: logits of the last position only (``[B, 1, V]``), as a prefill needs: the LM head is a
        large share of a prefill's FLOPs (SmolLM2: vocab 49152 × hidden 576 per token).

        ``positions`` restart at 0 per packed document; attention stays within equal ``segment_ids``. A block's
        attention over itself is causal and windowed by token index as well as by position (the two agree when
        positions count up by one inside each segment, as in every batch this package builds). With a
        ``cache`` (see ``init_cache``) the new tokens' keys/values are written at ``cache["index"]`` and queries
        attend to every filled slot whose position is not in their future and within the sliding window.
        ``prefill=True`` promises the cache is empty (``index`` 0): the block then attends over its own keys only,
        not over the cache's empty slots.
        ``layers``: per-layer weights (``layer_list()``) run by a Python loop instead of the scan over the stacked
        weights, whose per-layer slices XLA copies (see ``decode.Decoder``); with it, a cache whose ``k`` and ``v``
        are lists of per-layer arrays is not sliced either.

        A float32 model's products are full float32 (``full_fp32_dots``), never a GPU's default TF32.
        """
        with full_fp32_dots(self.compute_dtype):
            return self._forward(tokens, positions, segment_ids, cache=cache, dropout_key=dropout_key,
                                 return_hidden=return_hidden, last_only=last_only, prefill=prefill, layers=layers)

    def _forward(self, tokens, positions, segment_ids, *, cache, dropout_key, return_hidden, last_only, prefill,
                 layers):
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = jnp.take(self.embed[...], tokens, axis=0)
        pad = cfg.pad_token_id
        if pad is not None and -cfg.vocab_size <= pad < cfg.vocab_size:
            # transformers' nn.Embedding(padding_idx=pad): the pad row gets no gradient from the lookup (full
            # fine-tuning; SmolLM2's pad id is its end-of-text, an input of every packed document)
            x = jnp.where((tokens == pad % cfg.vocab_size)[..., None], jax.lax.stop_gradient(x), x)
        x = x.astype(self.compute_dtype)
        cos, sin = rope_tables(positions, rope_inv_freq(cfg))

        if cache is None or prefill:
            # self-attention over this block: fused (cuDNN) where available, else an explicit mask
            if self.attention_impl() == "cudnn":
                mask = fused_masking(segment_ids, positions)
            else:
                mask = self_attention_mask(positions, segment_ids, cfg.sliding_window)
        else:
            mask = None
        if cache is not None:
            idx = cache["index"]
            q_pos = jnp.where(segment_ids > 0, positions, -1)
            k_pos = jax.lax.dynamic_update_slice(cache["pos"], q_pos.astype(jnp.int32), (0, idx))
            if mask is None:  # attention over the cache: one additive bias for every layer
                mask = mask_bias(attention_mask(positions, segment_ids, k_pos, (k_pos >= 0).astype(jnp.int32),
                                                cfg.sliding_window))
            kv_in = (cache["k"], cache["v"])
        else:
            kv_in = None

        weights = nnx.to_pure_dict(nnx.state(self.layers))
        n = cfg.num_layers
        keys = (jax.random.split(dropout_key, n) if dropout_key is not None
                else jnp.zeros((n, 2), jnp.uint32))

        index = None if cache is None else cache["index"]

        def body(carry, xs):
            # The whole cache rides in the carry and each layer updates its own slots in place; passing it
            # through xs/ys would copy every layer's cache on every decode step.
            h, ck, cv = carry
            w, key, layer = xs
            kv = None if cache is None else (ck, cv, layer)
            h, new_kv = self._block(h, w, cos, sin, mask, key if dropout_key is not None else None, kv, index,
                                    prefill)
            if new_kv is not None:
                ck, cv = new_kv
            return (h, ck, cv), None

        if REMAT_POLICIES[self.remat] is not None or self.remat == "full":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        kv0 = kv_in if kv_in is not None else (jnp.zeros((), x.dtype), jnp.zeros((), x.dtype))
        if layers is None:
            (x, ck, cv), _ = jax.lax.scan(body, (x, *kv0), (weights, keys, jnp.arange(n)))
        elif cache is not None and isinstance(kv0[0], list):  # per-layer caches: no step slices a stacked array
            ck, cv = list(kv0[0]), list(kv0[1])
            for i, w in enumerate(layers):
                x, (ck[i], cv[i]) = self._block(x, w, cos, sin, mask, keys[i] if dropout_key is not None else None,
                                                (ck[i], cv[i], None), index, prefill)
        else:
            carry = (x, *kv0)
            for i, w in enumerate(layers):
                carry, _ = body(carry, (w, keys[i], i))
            x, ck, cv = carry
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if return_hidden:
            return x
        if last_only:
            x = x[:, -1:]
        logits = x @ self.head_weight()
        new_cache = None
        if cache is not None:
            new_cache = {"k": ck, "v": cv, "pos": k_pos, "index": cache["index"] + t}
        return logits, new_cache

    def head_weight(self) -> Array:
        """The LM head ``[hidden, vocab]`` in the compute dtype (the embedding's transpose when tied)."""
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head.astype(self.compute_dtype)

    def layer_list(self) -> list[dict]:
        """Each layer's weights as separate arrays (a copy of the stacked weights)."""
        weights = nnx.to_pure_dict(nnx.state(self.layers))
        return [jax.tree.map(lambda a, i=i: a[i], weights) for i in range(self.cfg.num_layers)]

    def attention_impl(self) -> str:
        """``cudnn`` (fused flash attention) or ``xla`` (explicit mask); ``auto`` is cuDNN on a GPU in bf16/fp16."""
        return resolve_attention(self.attention, self.compute_dtype, self.cfg.head_dim)

    def _block(self, x, w, cos, sin, mask, key, kv, index, prefill=False):
        cfg = self.cfg
        b, t, _ = x.shape
        h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
        q = self._proj(h, w["q"], key, 0).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self._proj(h, w["k"], key, 1).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self._proj(h, w["v"], key, 2).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            ck, cv, layer = kv  # layer None: this layer's own cache arrays, else the stacked cache
            kt_new, v_new = k.transpose(0, 2, 3, 1).astype(ck.dtype), v.transpose(0, 2, 1, 3).astype(cv.dtype)
            if layer is None:
                ck = jax.lax.dynamic_update_slice(ck, kt_new, (0, 0, 0, index))
                cv = jax.lax.dynamic_update_slice(cv, v_new, (0, 0, index, 0))
            else:
                ck = jax.lax.dynamic_update_slice(ck, kt_new[None], (layer, 0, 0, 0, index))
                cv = jax.lax.dynamic_update_slice(cv, v_new[None], (layer, 0, 0, index, 0))
            new_kv = (ck, cv)
        if kv is not None and not prefill:  # attend over the cache (this block's keys are in it now)
            if layer is None:
                kt, vc = ck.astype(q.dtype), cv.astype(q.dtype)
            else:
                kt = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(q.dtype)
                vc = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(q.dtype)
            attn = cached_attention(q, kt, vc, mask)
        elif isinstance(mask, Fused):
            attn = fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.sliding_window)
        else:
            attn = causal_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.sliding_window)
        attn = attn.reshape(b, t, cfg.q_size)
        x = x + self._proj(attn, w["o"], key, 3)
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        gate = self._proj(h, w["gate"], key, 4)
        up = self._proj(h, w["up"], key, 5)
        x = x + self._proj(swiglu(gate, up), w["down"], key, 6)
        return x, new_kv

    def _proj(self, x, w: dict, key, salt: int):
        y = x @ w["kernel"].astype(x.dtype)
        if "lora_a" in w:
            rate = float(self.lora_cfg.dropout)
            keep = None if key is None or rate <= 0 else dropout_keep(x.shape, jax.random.fold_in(key, salt), rate)
            # as PEFT: the branch in the factors' dtype (float32), added to the base output, then rounded once
            y = (y + lora_delta(x, w["lora_a"], w["lora_b"], float(self.lora_cfg.scaling), keep, rate)
                 ).astype(x.dtype)
        return y

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache of ``length`` slots, laid out as ``cached_attention`` reads it without copies:
        keys ``k [layers, B, kv_heads, head_dim, S]``, values ``v [layers, B, kv_heads, S, head_dim]``."""
        cfg = self.cfg
        dtype = dtype or self.compute_dtype
        kvh, d = cfg.num_kv_heads, cfg.head_dim
        return {"k": jnp.zeros((cfg.num_layers, batch, kvh, d, length), dtype),
                "v": jnp.zeros((cfg.num_layers, batch, kvh, length, d), dtype),
                "pos": jnp.full((batch, length), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}


# -- building blocks (pure functions) ----------------------------------------------------------------------------

def full_fp32_dots(dtype):
    """Float32 products computed in full float32 while ``dtype`` is float32, as torch computes them: JAX's default
    on a GPU rounds float32 operands to TF32 (10-bit mantissa), ~1e-3 relative error per product."""
    return jax.default_matmul_precision("highest") if jnp.dtype(dtype) == jnp.float32 else contextlib.nullcontext()


def dropout_keep(shape: tuple[int, ...], key: Array, rate: float) -> Array:
    """PEFT's ``lora_dropout`` mask: boolean ``shape``, False (dropped) with probability ``rate``. Each element takes
    one 16-bit half of a 32-bit threefry word (P(drop) is ``rate`` to within 1e-5): on the 2-core CPU a
    [4, 256, 576] mask and its use take 2.1 ms this way, 7.5 ms with ``bits(..., uint16)`` (which runs threefry per
    16-bit draw) and 7.3 ms in torch's dropout."""
    last = shape[-1]
    words = jax.random.bits(key, (*shape[:-1], (last + 1) // 2), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*shape[:-1], -1)[..., :last]
    return bits >= jnp.uint16(min(round(rate * 65536), 65535))


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) · up``, the silu in float32 and rounded once (as torch's), with a backward that keeps only
    ``gate`` and ``up`` and recomputes the sigmoid: autodiff kept three more ``[tokens, intermediate]`` arrays per
    layer (SmolLM2's step: the layer scan's saved activations 81 -> 55 MB per layer with ``lora_delta``'s). Like
    ``lora_delta``, it has no forward-mode rule (``jax.jvp`` through the model raises; ``jax.grad`` is the path)."""
    return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up, (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    x = gate.astype(jnp.float32)
    s = jax.nn.sigmoid(x)
    d_up = (g * (x * s).astype(gate.dtype)).astype(up.dtype)
    d_act = (g * up).astype(jnp.float32)
    return (d_act * (s * (1 + x * (1 - s)))).astype(gate.dtype), d_up  # torch's silu_backward


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 5))
def lora_delta(x: Array, a: Array, b: Array, scaling: float, keep: Array | None, rate: float) -> Array:
    """PEFT's LoRA branch ``((dropout(x) @ A) @ B) · scaling`` in the factors' dtype (``x`` cast to it before the
    dropout, as PEFT casts a bf16 input for its float32 factors). ``keep``: the dropout mask (``dropout_keep``;
    None: no dropout), kept values scaled by ``1 / (1 - rate)`` as torch's dropout scales them.

    The backward keeps ``x`` and the mask, not the dropped input: the q/k/v (and gate/up) branches share one saved
    input. It contracts over tokens with the big operands (``x``, the output cotangent) as the row-major right-hand
    side: autodiff's order made XLA transpose them (on the 2-core CPU, 2.3 s of a 12 s SmolLM2 step were such
    transposing copies)."""
    return _lora_fwd(x, a, b, scaling, keep, rate)[0]


def _keep_scale(rate: float, dtype) -> np.ndarray:
    """``1 / (1 - rate)`` as torch's dropout makes it: one division in the tensor's dtype, then a multiply."""
    return np.asarray(1.0, dtype) / np.asarray(1.0 - rate, dtype)


def _dropped(x, keep, rate, dtype):
    x = x.astype(dtype)
    return x if keep is None else jnp.where(keep, x * _keep_scale(rate, dtype), 0).astype(dtype)


def _lora_fwd(x, a, b, scaling, keep, rate):
    u = _dropped(x, keep, rate, a.dtype) @ a
    return (u @ b) * jnp.asarray(scaling, a.dtype), (x, keep, a, b, u)


def _lora_bwd(scaling, rate, res, g):
    x, keep, a, b, u = res
    with full_fp32_dots(x.dtype):  # traced apart from the forward (and its precision)
        return _lora_grads(scaling, rate, x, keep, a, b, u, g)


def _lora_grads(scaling, rate, x, keep, a, b, u, g):
    g2 = (g * jnp.asarray(scaling, g.dtype)).reshape(-1, g.shape[-1])
    x2, u2 = _dropped(x, keep, rate, a.dtype).reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
    over_tokens = (((0,), (0,)), ((), ()))
    db = jax.lax.dot_general(u2, g2, over_tokens)  # [r, out]
    du = g2 @ b.T  # [N, r]
    da = jax.lax.dot_general(du, x2, over_tokens).T  # [in, r]
    dx = (du @ a.T).reshape(x.shape)
    if keep is not None:
        dx = jnp.where(keep, dx * _keep_scale(rate, dx.dtype), 0)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), None


lora_delta.defvjp(_lora_fwd, _lora_bwd)


def resolve_attention(name: str, compute_dtype, head_dim: int) -> str:
    """The attention implementation ``name`` stands for on this backend (``auto`` → cuDNN only where it runs)."""
    half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    usable = jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    if name == "auto":
        return "cudnn" if usable else "xla"
    if name == "cudnn" and not usable:
        raise UserError("attention='cudnn' needs a GPU, a bf16/fp16 compute dtype and head_dim a multiple of 8 "
                        f"up to 128 (backend {jax.default_backend()}, dtype {jnp.dtype(compute_dtype).name}, "
                        f"head_dim {head_dim})")
    return name


class Fused(NamedTuple):
    """The fused path's masking: ``segments``, a boolean ``[B, 1, T, T]`` same-segment mask, and ``plain``, a
    scalar that is true when no row needs it (causality and the window are the kernel's own)."""

    segments: Array
    plain: Array


def fused_masking(segment_ids: Array, positions: Array) -> Fused:
    """The segment mask and whether the batch can skip it: every row is one document at positions 0, 1, … with
    only padding after it (padding queries' outputs are never used)."""
    segments = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0))[:, None]
    t = segment_ids.shape[1]
    one_doc = jnp.all(segment_ids <= 1) & jnp.all(segment_ids[:, 1:] <= segment_ids[:, :-1])
    counting = jnp.all((segment_ids == 0) | (positions == jnp.arange(t, dtype=positions.dtype)))
    return Fused(segments, one_doc & counting)


def fused_attention(q: Array, k: Array, v: Array, masking: Fused | None, window: int | None,
                    implementation: str = "cudnn") -> Array:
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on a GPU): causal by index, the sliding window as
    cuDNN's left window, packed documents / padding by the segment mask, which is skipped (a cheaper kernel) when
    the batch does not need it.

    Equal to ``gqa_attention`` with ``attention_mask`` whenever positions count up by one inside each segment, as
    every batch our pipelines and decoder build does (packed documents, right-padded rows, left-padded prompts).
    """
    local = None if window is None else (window - 1, 0)
    t = q.shape[1]
    if implementation == "cudnn" and (t % 2 or k.shape[1] % 2):
        # cuDNN's training kernels need even lengths: the explicit-mask path, same semantics
        allowed = index_mask(t, window)
        return causal_attention(q, k, v, allowed if masking is None else masking.segments[:, 0] & allowed, window)

    def attend(mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                            implementation=implementation)

    if masking is None:
        return attend(None)
    return jax.lax.cond(masking.plain, lambda: attend(None), lambda: attend(masking.segments))


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF's RMSNorm: statistics in fp32, cast back to the input dtype, then scale. A bf16/fp16 input is rounded to
    its dtype first: XLA's excess precision would otherwise feed the norm a residual add's unrounded fp32 sum (bf16
    logits of a one-token input then matched transformers' in 24 % of the entries instead of all)."""
    x32 = x.astype(jnp.float32)
    if x.dtype != jnp.float32:
        info = jnp.finfo(x.dtype)
        x32 = jax.lax.reduce_precision(x32, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies ``[head_dim / 2]`` (fp32), computed as transformers' rope init functions do
    (``default``, ``linear`` and ``llama3``), in fp32 like them."""
    d = cfg.head_dim
    # torch's float32 power is within an ulp of the exact one; numpy's float32 power is off by an ulp in ~20 % of
    # the entries, which the angles grow to ~1e-1 of a logit at position 8000. So: the exponent in float32 (as
    # torch), the power in float64, rounded once.
    exponent = (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
    inv = np.float32(1.0) / (np.float64(cfg.rope_theta) ** exponent).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        # as torch rounds it: a Python number over a tensor is the tensor's reciprocal times the number (in fp32);
        # Python numbers combined first are doubles, rounded once to fp32
        old, low, high = cfg.rope_original_max_position_embeddings, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        factor, f32 = np.float32(cfg.rope_factor), np.float32
        wavelen = (f32(1) / inv) * f32(2 * math.pi)
        scaled = np.where(wavelen > f32(old / low), inv / factor, inv)  # long wavelengths: interpolated
        smooth = ((f32(1) / wavelen) * f32(old) - f32(low)) / f32(high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < f32(old / high)) & ~(wavelen > f32(old / low))
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos/sin ``[B, T, head_dim]`` in fp32 for HF's rotate-half RoPE (``inv_freq`` from ``rope_inv_freq``)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x [B, T, H, D]``: x·cos + rotate_half(x)·sin, with rotate_half(x) = (−x₂, x₁)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def attention_mask(q_pos: Array, q_seg: Array, k_pos: Array, k_seg: Array, window: int | None) -> Array:
    """Boolean ``[B, T, S]``: same segment (non-zero keys), causal by position, and inside the sliding window."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0) & (kp <= qp)
    if window is not None:
        mask &= (qp - kp) < window
    return mask


def self_attention_mask(positions: Array, segment_ids: Array, window: int | None) -> Array:
    """``attention_mask`` of a block of tokens over itself, also causal (and windowed) by index, as the fused
    kernel is: the same mask whenever positions count up by one inside each segment (every batch our pipelines and
    decoder build), and what lets ``causal_attention`` skip the keys after a query block."""
    by_index = index_mask(positions.shape[1], window)
    return attention_mask(positions, segment_ids, positions, segment_ids, window) & by_index


def index_mask(t: int, window: int | None) -> Array:
    """Boolean ``[1, T, T]``: causal and inside the sliding window by token index (the fused kernel's own mask)."""
    idx, one = jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32)
    return attention_mask(idx, one, idx, one, window)


def causal_block_size(t: int) -> int:
    """Queries per block of ``causal_attention``: the whole block up to 128 tokens, then 128, or more to keep to 16
    blocks (SmolLM2's attention, forward + backward, on the 2-core CPU: blocks of 64 and 128 equal at 256 tokens,
    128 fastest at 512 and 1024; fewer blocks compile faster)."""
    return t if t <= 128 else max(128, -(-t // 16))


def causal_attention(q: Array, k: Array, v: Array, mask: Array, window: int | None) -> Array:
    """``gqa_attention`` of a block over itself (``k``/``v`` the same tokens as ``q``) under a mask that is causal by
    index (``self_attention_mask``), in blocks of queries that each read only the keys they may see: none after the
    block's last query, none before its first query's window. The result is ``gqa_attention``'s to float rounding
    (the skipped scores are masked there: exact zeros after the softmax; the sums run over fewer terms), but for fully
    masked (padding) queries, which average their block's keys instead of all keys. A mask that is not causal by
    index would be cut silently: only a block's self-attention under ``self_attention_mask`` may come here. Two
    blocks do 3/4 of a causal block's products and softmax, 16 blocks 17/32: SmolLM2's attention (30 layers,
    forward + backward) on the 2-core CPU, 4 x 256 tokens: 0.95 -> 0.68 s; 2 x 512: 2.12 -> 1.17 s."""
    t = q.shape[1]
    if k.shape[1] != t:
        raise ValueError(f"causal_attention is self-attention: {t} queries, {k.shape[1]} keys")
    size = causal_block_size(t)
    if size >= t:
        return gqa_attention(q, k, v, mask)
    outs = []
    for q0 in range(0, t, size):
        q1 = min(q0 + size, t)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        outs.append(gqa_attention(q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], mask[:, q0:q1, k0:q1]))
    return jnp.concatenate(outs, axis=1)


def mask_bias(mask: Array) -> Array:
    """A boolean attention mask as the fp32 additive bias ``cached_attention`` takes: 0 where allowed, else
    ``NEG_INF``."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def cached_attention(q: Array, kt: Array, v: Array, bias: Array) -> Array:
    """``gqa_attention`` over a KV cache: q ``[B,T,H,D]``, keys ``kt [B,KVH,D,S]``, values ``v [B,KVH,S,D]``,
    ``bias [B,T,S]`` (``mask_bias`` of the mask, made once for all layers) → ``[B,T,H,D]``.

    Both products are plain (row-major) batched matmuls over the cache as it lies, so XLA:CPU reads it once
    instead of transposing a copy of it for every decode step. The softmax is normalised after the second product
    (``[.., D]`` divided instead of ``[.., S]``), as flash attention does: with the additive bias, a batch-64
    decode step takes 7-12 % less time on the 2-core CPU than with the masked softmax. A fully masked row stays
    finite (a uniform average, as ``gqa_attention``)."""
    b, t, h, d = q.shape
    kvh = kt.shape[1]
    g = h // kvh
    q = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)  # rows (group, token)
    scores = jnp.einsum("bkrd,bkds->bkrs", q, kt, preferred_element_type=jnp.float32).reshape(b, kvh, g, t, -1)
    scores = scores * (d ** -0.5) + bias[:, None, None]
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkrs,bksd->bkrd", weights.astype(v.dtype).reshape(b, kvh, g * t, -1), v,
                     preferred_element_type=jnp.float32).reshape(b, kvh, g, t, d)
    out = (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def gqa_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention without repeating K/V: q ``[B,T,H,D]``, k/v ``[B,S,KVH,D]`` → ``[B,T,H,D]``."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
