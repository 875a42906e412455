#!/usr/bin/env python3
"""Attention forward + backward at one shape: our explicit-mask einsum, the fused path (cuDNN on a GPU) with and
without the segment mask, and torch ``scaled_dot_product_attention`` (flash) on the same shape.

    python tools/bench_attention.py [--batch 1 --seq 3000 --heads 32 --kv-heads 8 --head-dim 128 --window 4096]
        [--dtype bfloat16] [--iters 20] [--json OUT]

Reports the median ms of ``iters`` timed calls after warm-up and TFLOP/s counted as causal attention FLOPs
(forward 2 matmuls, backward 4; the masked half not counted). Meant for a GPU; runs (slowly) on CPU with the
fused call's XLA implementation.
"""
from __future__ import annotations

import argparse
import sys
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # noqa: E402  (argument checks, JSON output)


def causal_flops(b, t, h, d, window) -> float:
    span = min(t, window or t)
    pairs = t * span - span * (span - 1) / 2 if window and window < t else t * (t + 1) / 2
    return 6 * 2 * b * h * d * pairs  # fwd QK^T, PV; bwd dQ, dK, dV, dP


def time_it(fn, args, iters) -> float:
    import jax

    return bt.median_seconds(lambda: jax.block_until_ready(fn(*args)), iters, warmup=2)


def run_jax(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cancerllm_jax.model.mistral import Fused, attention_mask, fused_attention, fused_masking, gqa_attention

    dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)), dt)
    k = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dt)
    v = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dt)
    seg = jnp.ones((a.batch, a.seq), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(a.seq, dtype=jnp.int32), (a.batch, a.seq))
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    variants = {
        "einsum (explicit mask)": lambda q, k, v: gqa_attention(q, k, v, attention_mask(pos, seg, pos, seg, a.window)),
        f"fused {impl} + segment mask": lambda q, k, v: fused_attention(
            q, k, v, Fused(fused_masking(seg, pos).segments, jnp.asarray(False)), a.window, impl),
        f"fused {impl}, causal only": lambda q, k, v: fused_attention(q, k, v, None, a.window, impl),
        f"fused {impl}, auto (cond)": lambda q, k, v: fused_attention(q, k, v, fused_masking(seg, pos), a.window,
                                                                       impl),
    }
    out = {}
    for name, f in variants.items():
        def loss(q, k, v, f=f):
            return jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            out[name] = time_it(step, (q, k, v), a.iters)
        except Exception as e:  # a variant the backend cannot run: reported, the others still run
            out[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


def run_torch(a) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(a.batch, a.heads, a.seq, a.head_dim, device="cuda", dtype=dt, generator=g, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device="cuda", dtype=dt, generator=g, requires_grad=True)
    v = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device="cuda", dtype=dt, generator=g, requires_grad=True)

    def step():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.float().pow(2).sum().backward()

    def synced_step():
        step()
        torch.cuda.synchronize()

    return {"torch sdpa (is_causal, no window)": bt.median_seconds(synced_step, a.iters, warmup=3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--batch", type=bt.positive_int, default=1)
    p.add_argument("--seq", type=bt.positive_int, default=3000)
    p.add_argument("--heads", type=bt.positive_int, default=32)
    p.add_argument("--kv-heads", type=bt.positive_int, default=8)
    p.add_argument("--head-dim", type=bt.positive_int, default=128)
    p.add_argument("--window", type=int, default=4096, help="sliding window (0: none)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--iters", type=bt.positive_int, default=20)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    if a.window < 0:
        p.error(f"--window must be >= 0 (0: no window), got {a.window}")
    bt.check_json_out(p, a.json)
    a.window = a.window or None  # as causal_flops counts it: 0 is no window, not an empty one
    res = run_jax(a)
    try:
        res.update(run_torch(a))
    except ImportError:
        pass
    flops = causal_flops(a.batch, a.seq, a.heads, a.head_dim, a.window)
    print(f"attention fwd+bwd, batch {a.batch} x seq {a.seq}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, "
          f"window {a.window}, {a.dtype}; {flops / 1e12:.2f} TFLOP (causal)")
    rows = {}
    for name, t in res.items():
        # torch's sdpa has no sliding window: it attends (and is credited) over every earlier key
        f = causal_flops(a.batch, a.seq, a.heads, a.head_dim, None) if name.startswith("torch") else flops
        if isinstance(t, str):
            print(f"  {name:<36} {t}")
            rows[name] = {"error": t}
        else:
            print(f"  {name:<36} {1e3 * t:9.2f} ms {f / t / 1e12:8.1f} TFLOP/s")
            rows[name] = {"ms": 1e3 * t, "tflops": f / t / 1e12}
    if a.json:
        bt.write_json(a.json, {"args": vars(a), "results": rows})
    return 1 if all("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
