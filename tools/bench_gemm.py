#!/usr/bin/env python3
"""Matrix-multiply speed of XLA (``jax.jit(jnp.matmul)``) and torch (``torch.matmul``) side by side, on the GEMM
shapes of the benchmarked train step and decode step, in one process, median after warm-up.

    python tools/bench_gemm.py [--dtype float32|bfloat16] [--repeats 20] [--shapes 1024x576x1536,...] [--json OUT]

The CPU ratios of ``bench_train.py`` / ``bench_decode.py`` follow the two libraries' GEMM speed on the machine at
hand (XLA:CPU's YNNPACK vs torch's MKL / oneDNN): run this beside them to tell the machine from the code.
Default shapes (M x K x N): SmolLM2-135M's projections and LM head at M = 1024 tokens (the train step's 4 x 256) and
one projection at M = 64 (a batch-64 decode step).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train as bt  # noqa: E402  (machine(), JSON helpers; puts this checkout's package first on sys.path)

SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (1024, 576, 49152), (64, 576, 1536))


def parse_shapes(p: argparse.ArgumentParser, text: str) -> list[tuple[int, int, int]]:
    """``"MxKxN,MxKxN"`` → shapes; anything else is one clear error (exit 2)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(d.isdigit() and int(d) > 0 for d in parts):
            p.error(f"--shapes: {item.strip()!r} is not MxKxN with positive integers")
        shapes.append(tuple(int(d) for d in parts))
    return shapes


def measure(shapes, dtype: str, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    matmul = jax.jit(jnp.matmul)
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()  # both sides on the same device
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for m, k, n in shapes:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        ta, tb = (torch.from_numpy(x).to("cuda" if cuda else "cpu", getattr(torch, dtype)) for x in (a, b))
        flops = 2 * m * k * n
        jax_s = bt.median_seconds(lambda: matmul(ja, jb).block_until_ready(), repeats)  # warm-up compiles
        torch_s = bt.median_seconds(lambda: (torch.matmul(ta, tb), sync()), repeats)
        rows.append({"shape": f"{m}x{k}x{n}", "jax_gflops": flops / jax_s / 1e9, "torch_gflops": flops / torch_s / 1e9})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shapes", help="comma-separated MxKxN (default: the SmolLM2 train / decode shapes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    shapes = parse_shapes(p, args.shapes) if args.shapes else list(SHAPES)
    bt.check_json_out(p, args.json)
    import torch

    rows = measure(shapes, args.dtype, args.repeats)
    mach = bt.machine()
    print(f"machine: {mach}; {args.dtype}; torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'M x K x N':>18}  {'XLA GF/s':>9}  {'torch GF/s':>10}  ratio")
    for r in rows:
        print(f"{r['shape']:>18}  {r['jax_gflops']:9.0f}  {r['torch_gflops']:10.0f}  "
              f"{r['jax_gflops'] / r['torch_gflops']:.2f}x")
    if args.json:
        bt.write_json(args.json, {"machine": mach, "dtype": args.dtype, "repeats": args.repeats, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
