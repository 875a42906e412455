#!/usr/bin/env python3
"""Where a step's device time goes: traces our train step or decode with ``jax.profiler`` and prints the kernels
that take the most time (summed per name), their share, and the gap between kernel time and wall time.

    python tools/profile_step.py train  [--preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 --remat none]
    python tools/profile_step.py decode [--preset mistral-7b --batch 1 --prompt-tokens 512 --new 32]
        [--top 25] [--hlo DIR]   (DIR: the compiled HLO text, to look fusion names up)

Meant for a GPU (on CPU the trace holds host threads, not kernels).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train as bt  # noqa: E402
from cancerllm_jax.errors import cli_main  # noqa: E402  (bench_train put this checkout's package first)


def kernel_times(logdir: str) -> tuple[dict, float]:
    """``({kernel name: (total ns, count)}, span ns)`` of the device planes of the newest trace under ``logdir``."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)[-1]
    data = ProfileData.from_file(path)
    totals: dict = collections.defaultdict(lambda: [0, 0])
    lo, hi = None, None
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                totals[ev.name][0] += ev.duration_ns
                totals[ev.name][1] += 1
                lo = ev.start_ns if lo is None else min(lo, ev.start_ns)
                hi = ev.start_ns + ev.duration_ns if hi is None else max(hi, ev.start_ns + ev.duration_ns)
    return dict(totals), (hi - lo) if lo is not None else 0.0


def report(title: str, logdir: str, wall_s: float, top: int) -> None:
    totals, span = kernel_times(logdir)
    busy = sum(v[0] for v in totals.values())
    print(f"\n== {title}: wall {1e3 * wall_s:.1f} ms, device span {span / 1e6:.1f} ms, kernel time "
          f"{busy / 1e6:.1f} ms ({sum(v[1] for v in totals.values())} kernels)")
    for name, (ns, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ns / 1e6:9.2f} ms {100 * ns / max(busy, 1):5.1f}%  x{n:<6d} {name[:110]}")


def profile_train(a) -> None:
    import jax

    a.rank, a.steps, a.warmup = 8, 1, 1
    cfg = bt.model_config(a.preset, None)
    step, state, frozen, batch, _ = bt.build_ours(a, cfg, None)
    compiled = step.lower(state, frozen, batch).compile()
    if a.hlo:
        os.makedirs(a.hlo, exist_ok=True)
        with open(os.path.join(a.hlo, "train_step.txt"), "w", encoding="utf-8") as f:
            f.write(compiled.as_text())
    for _ in range(2):
        state, m = compiled(state, frozen, batch)
    jax.block_until_ready(m)
    logdir = tempfile.mkdtemp(prefix="trace-")
    with jax.profiler.trace(logdir):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready(m)
        wall = time.perf_counter() - t0
    report(f"train step {a.preset} batch {a.batch} x seq {a.seq}, remat {a.remat}", logdir, wall, a.top)


def profile_decode(a) -> None:
    import jax

    import bench_decode as bd
    from cancerllm_jax.decode import Decoder

    cfg = bt.model_config(a.preset, None)
    lm = bd.load_ours(a, cfg, None)
    from cancerllm_jax.data.tokenizer import load_tokenizer

    prompts = bd.clinical_prompts(load_tokenizer(None), a.batch, a.prompt_tokens, fill=True)
    dec = Decoder(lm)
    for new in (a.new, 1):
        dec.generate(prompts, max_new_tokens=new, eos_id=[], batch_size=a.batch)
    for new in (a.new, 1):
        logdir = tempfile.mkdtemp(prefix="trace-")
        with jax.profiler.trace(logdir):
            t0 = time.perf_counter()
            dec.generate(prompts, max_new_tokens=new, eos_id=[], batch_size=a.batch)
            wall = time.perf_counter() - t0
        report(f"generate {new} tokens, batch {a.batch}, prompts {len(prompts[0])} tokens", logdir, wall, a.top)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("what", choices=("train", "decode"))
    p.add_argument("--preset", default="mistral-7b", choices=bt.PRESETS[1:])
    p.add_argument("--seq", type=bt.positive_int, default=3000)
    p.add_argument("--batch", type=bt.positive_int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--unstack", default="auto", choices=("auto", "no", "yes"),
                   help="train: the frozen layer weights per layer (yes) or stacked (no); auto as the Trainer")
    p.add_argument("--response-fraction", type=float, default=1.0,
                   help="train: the loss on each row's last fraction of tokens (the fine-tuning step), as bench_train")
    p.add_argument("--prompt-tokens", type=bt.positive_int, default=512)
    p.add_argument("--new", type=bt.positive_int, default=32)
    p.add_argument("--top", type=bt.positive_int, default=25)
    p.add_argument("--hlo", help="write the compiled HLO text here")
    a = p.parse_args(argv)
    if not 0 < a.response_fraction <= 1 or round(a.response_fraction * a.seq) < 1:
        p.error(f"--response-fraction must be in (0, 1] and leave at least one loss token per row, got "
                f"{a.response_fraction}")
    bt.resolve_dtype_and_attention(p, a)
    if a.hlo and a.what == "decode":  # every module generate compiles (prefill, decode loop, cache join)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={a.hlo} --xla_dump_hlo_as_text"
    (profile_train if a.what == "train" else profile_decode)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
