"""The fused attention path (``jax.nn.dot_product_attention``: cuDNN flash attention on a GPU) against the
explicit-mask attention the parity tests pin to transformers.

On CPU the fused call runs with ``implementation="xla"``: that checks our mapping of causality, the sliding window
and packed / padded segments onto the kernel's arguments. On a GPU the same comparisons run through cuDNN, and a
whole model (logits, LoRA gradients, greedy decoding) is compared between ``attention="cudnn"`` and ``"xla"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cancerllm_jax as cj
from cancerllm_jax.errors import UserError
from cancerllm_jax.model.mistral import (Fused, attention_mask, causal_attention, causal_block_size, fused_attention,
                                         fused_masking, gqa_attention, self_attention_mask)

ON_GPU = jax.default_backend() == "gpu"


def packed_rows(t: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments / positions of four row shapes: one document, three packed documents, right and left padding."""
    seg = np.zeros((4, t), np.int32)
    pos = np.zeros((4, t), np.int32)
    seg[0], pos[0] = 1, np.arange(t)
    cuts = [0, 5, 12, t]
    for i in range(3):
        seg[1, cuts[i]:cuts[i + 1]] = i + 1
        pos[1, cuts[i]:cuts[i + 1]] = np.arange(cuts[i + 1] - cuts[i])
    seg[2, :t - 6], pos[2, :t - 6] = 1, np.arange(t - 6)  # right padding (a training row)
    seg[3, 4:], pos[3, 4:] = 1, np.arange(t - 4)  # left padding (a decode prompt)
    return seg, pos


@pytest.mark.parametrize("window", [None, 50, 1])
@pytest.mark.parametrize("heads,kv_heads,t", [(6, 2, 200), (4, 1, 300)])
def test_blocked_causal_attention_equals_the_whole_block(window, heads, kv_heads, t):
    """``causal_attention`` (query blocks that skip the keys after the block and before its window) gives
    ``gqa_attention``'s outputs and gradients on packed, right- and left-padded rows past the window; the mask by
    position equals the mask by position and index on such rows; the check can fail (a mask that is not causal)."""
    assert causal_block_size(t) < t  # really blocked: 2 / 3 blocks of 128 (the last shorter)
    d = 8
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.standard_normal((4, t, h, d)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    seg, pos = packed_rows(t)
    mask = self_attention_mask(jnp.asarray(pos), jnp.asarray(seg), window)
    assert np.array_equal(np.asarray(mask), np.asarray(attention_mask(pos, seg, pos, seg, window)))
    real = jnp.asarray(seg > 0)[..., None, None]  # padding queries' outputs are never used
    g = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v) * g, 0.0))

    whole = jax.value_and_grad(lambda *a: loss(lambda q, k, v: gqa_attention(q, k, v, mask), *a), (0, 1, 2))(q, k, v)
    blocked = jax.jit(jax.value_and_grad(lambda *a: loss(lambda q, k, v: causal_attention(q, k, v, mask, window), *a),
                                         (0, 1, 2)))(q, k, v)
    for ours, ref in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-5)
    out = causal_attention(q, k, v, mask, window)
    assert np.isfinite(np.asarray(out)).all()  # fully masked (padding) queries too
    anti = jnp.swapaxes(mask, 1, 2)  # keys after the query: the blocks skip them, the whole block does not
    assert np.abs(np.asarray(causal_attention(q, k, v, anti, window) - gqa_attention(q, k, v, anti))).max() > 1e-2
    with pytest.raises(ValueError, match="self-attention"):  # keys that are not the queries' own tokens
        causal_attention(q, k[:, 1:], v[:, 1:], mask[:, :, 1:], window)


@pytest.mark.parametrize("window", [None, 7, 1])
@pytest.mark.parametrize("heads,kv_heads,t", [(4, 4, 23), (8, 2, 24)])
def test_fused_equals_explicit_mask(window, heads, kv_heads, t):
    d = 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, t, h, d)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    seg, pos = packed_rows(t)
    ref = gqa_attention(q, k, v, attention_mask(pos, seg, pos, seg, window))
    impl = "cudnn" if ON_GPU else "xla"
    dt = jnp.bfloat16 if ON_GPU else jnp.float32
    real = seg > 0  # padding queries attend to nothing; their outputs are never used
    masking = fused_masking(jnp.asarray(seg), jnp.asarray(pos))
    assert not bool(masking.plain)  # packed and left-padded rows need the segment mask
    for rows in (slice(None), slice(0, 1), slice(2, 3)):  # all rows; one document; right padding (plain kernel)
        m = fused_masking(jnp.asarray(seg[rows]), jnp.asarray(pos[rows]))
        if rows != slice(None):
            assert bool(m.plain)
        out = fused_attention(q[rows].astype(dt), k[rows].astype(dt), v[rows].astype(dt), m, window,
                              implementation=impl)
        err = np.abs(np.asarray(out, np.float32) - np.asarray(ref[rows]))[real[rows]]
        assert err.max() < (3e-2 if ON_GPU else 1e-5), (rows, err.max())
        forced = fused_attention(q[rows].astype(dt), k[rows].astype(dt), v[rows].astype(dt),
                                 Fused(m.segments, jnp.asarray(False)), window, implementation=impl)
        err = np.abs(np.asarray(forced, np.float32) - np.asarray(ref[rows]))[real[rows]]
        assert err.max() < (3e-2 if ON_GPU else 1e-5), (rows, err.max())


def test_window_changes_the_fused_result():
    """A test that can fail: the window really reaches the kernel."""
    t, d = 23, 16
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 2, d)), jnp.float32) for _ in range(3))
    seg = jnp.ones((1, t), jnp.int32)
    impl = "cudnn" if ON_GPU else "xla"
    dt = jnp.bfloat16 if ON_GPU else jnp.float32
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    a = fused_attention(q.astype(dt), k.astype(dt), v.astype(dt), fused_masking(seg, pos), None, impl)
    b = fused_attention(q.astype(dt), k.astype(dt), v.astype(dt), fused_masking(seg, pos), 4, impl)
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[:, 4:].max() > 0.1


def test_cudnn_is_refused_where_it_cannot_run(tmp_path):
    from cancerllm_jax.model.mistral import resolve_attention

    assert resolve_attention("auto", jnp.float32, 64) == "xla"
    if not ON_GPU:
        assert resolve_attention("auto", jnp.bfloat16, 64) == "xla"
        with pytest.raises(UserError, match="cudnn"):
            resolve_attention("cudnn", jnp.bfloat16, 64)
        import transformers

        transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)).save_pretrained(str(tmp_path), safe_serialization=True)
        with pytest.raises(UserError, match="cudnn"):  # at load, not at the first forward pass
            cj.load(str(tmp_path), attention="cudnn", dtype="bfloat16")


# ------------------------------------------------------------------------------------------------ GPU, whole model

@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")
def test_model_cudnn_matches_xla_on_gpu():
    from flax import nnx

    from cancerllm_jax.config import LoRAConfig, ModelConfig
    from cancerllm_jax.model import create_model

    cfg = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=64, sliding_window=9, tie_embeddings=False)
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    seg, pos = packed_rows(29)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 320, seg.shape), jnp.int32)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    out = {}
    for impl in ("xla", "cudnn"):
        model = create_model(cfg, lora, "bfloat16", seed=0, attention=impl)
        # non-zero B so the LoRA branch matters
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
        trainable = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), trainable)

        def loss(tr):
            m = nnx.merge(graphdef, tr, frozen)
            logits, _ = m(ids, pos, seg)
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            return -jnp.mean(jnp.where(seg[:, 1:] > 0, jnp.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1)[..., 0],
                                       0.0)), logits

        (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
        out[impl] = (float(val), np.asarray(logits, np.float32), jax.tree.leaves(grads))
    real = np.asarray(seg) > 0
    assert abs(out["xla"][0] - out["cudnn"][0]) < 1e-2 * abs(out["xla"][0])
    dl = np.abs(out["xla"][1] - out["cudnn"][1])[real]
    assert dl.max() < 0.1, dl.max()
    for gx, gc in zip(out["xla"][2], out["cudnn"][2]):
        gx, gc = np.asarray(gx, np.float32), np.asarray(gc, np.float32)
        assert np.linalg.norm(gx - gc) <= 5e-2 * np.linalg.norm(gx) + 1e-6
