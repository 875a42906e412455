#!/usr/bin/env python3
"""Greedy generation throughput: our batched jitted decode vs transformers ``generate`` (one at a time, batched).

    python tools/bench_decode.py --preset smollm2-135m [--prompts 16 --new 32 --batch 16 --prompt-tokens 128]
        [--dtype float32|bfloat16] [--only ours|hf-single|hf-batched ...] [--rounds N] [--json OUT] [--no-doc]

The same model and the same prompts on every side: clinical instructions from ``cancerllm_jax.data.synthetic``,
rendered with the Alpaca template for generation and cut to ``--prompt-tokens`` (the end of the context is cut,
as ``encode_prompt`` does). EOS is ignored on every side (exactly ``--new`` tokens per prompt), so tokens/s count
the same work. Reported per side: tokens/s over the whole run (warm: compilation is timed apart), time to first
token (a 1-token run), ms per decode step ((T(new) − T(1)) / (new − 1)) and, on a GPU, the decode step's fraction
of the HBM roofline: (weight bytes + KV-cache bytes read per step) / bandwidth / measured step time, against the
measured bandwidth (the best of host-timed 2 GiB copies and reads and a device loop of copies) and the datasheet's
(``HBM_SPEC``), for every side (the bytes a step needs are the same).
Greedy agreement: our tokens vs transformers' one-at-a-time tokens, per prompt (exact match) and per token (up to
the first divergence). Presets: ``smollm2-135m`` (real weights, CPU); ``mistral-7b`` (random weights of the real
shape, bf16 by default, GPU: ours only unless ``--only`` names more sides; for the batch-1 roofline); ``tiny``
(the tiny preset's shape, random weights: a quick check of the tool, no greedy agreement). ``--rounds N`` runs the
sides N times, reversing their order every other round, and reports medians over every round's runs plus each
round's ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # noqa: E402  (machine(), rss, doc helpers)

SIDES = ("ours", "hf-single", "hf-batched")


# ------------------------------------------------------------------------------------------------------ prompts

def clinical_prompts(tokenizer, n: int, budget: int, seed: int = 0, task: str | None = None,
                     fill: bool = False) -> list[list[int]]:
    """``n`` Alpaca generation prompts (``[bos] + prompt``) from the synthetic tasks, each within ``budget`` tokens.

    ``task``: only that task's questions (else round-robin over tasks, so short and long contexts mix).
    ``fill``: lengthen each context with further synthetic notes until the prompt is ``budget`` tokens (the end
    of the context is cut to fit), for benchmarks at the evaluation's prompt limit.
    """
    from cancerllm_jax.data.instruct import encode_prompt
    from cancerllm_jax.data.synthetic import instruction_datasets
    from cancerllm_jax.errors import UserError

    data = instruction_datasets(max(8, n // 2 if task == "phenotype" else n), seed)  # one note a patient per task
    if task is not None and task not in data:
        raise SystemExit(f"--task {task!r}: choose from {sorted(data)}")
    records = []
    for split in ("test", "val", "train"):
        for name in sorted(data):
            if task is None or name == task:
                records += data[name][split]
    by_task: dict = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    order, i = [], 0
    while len(order) < n and any(i < len(v) for v in by_task.values()):
        for name in sorted(by_task):
            if i < len(by_task[name]) and len(order) < n:
                order.append(by_task[name][i])
        i += 1
    if len(order) < n:  # more questions asked than the synthetic set holds: reuse them
        order = [order[j % len(order)] for j in range(n)]
    contexts = [r["context"] for r in records if r.get("context")]
    out = []
    for j, r in enumerate(order):
        context = r.get("context")
        if fill and context:
            k = j
            while len(tokenizer.encode(context)) < budget:
                context += "\n\n" + contexts[k % len(contexts)]
                k += 7
        try:
            ids, _ = encode_prompt(tokenizer, r["instruction"], context, budget, for_generation=True,
                                   example_id=r["id"])
        except UserError:  # its fix names generate.py's and evaluate.py's flags
            raise UserError(f"{r['id']}: its prompt needs more than --prompt-tokens {budget} even without a context; "
                            "raise --prompt-tokens") from None
        out.append([t for t in ids if t >= 0])
    return out


# --------------------------------------------------------------------------------------------------------- ours

# HBM bandwidth by the words of the device name (datasheets; the most specific match wins), for the roofline
# against the spec beside the one against the measured bandwidth
HBM_SPEC = {"H100": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12, "H200 NVL": 4.8e12,
            "GH200": 4.0e12}


def hbm_spec(device_name: str) -> float | None:
    """The datasheet HBM bandwidth of ``device_name`` (``NVIDIA H100 80GB HBM3``), or None when unknown."""
    words = set(re.split(r"[^0-9a-z]+", device_name.lower()))
    known = [k for k in HBM_SPEC if set(k.lower().split()) <= words]
    return HBM_SPEC[max(known, key=lambda k: len(k.split()))] if known else None


def _median_s(f, x, runs: int) -> float:
    f(x).block_until_ready()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measured_bandwidth(x, runs: int = 10, passes: int = 21) -> float:
    """Bytes per second the device moves over ``x``: the best of one copy per call, one read-only reduction per
    call (both timed from the host, dispatch included) and ``passes`` dependent copies in one jitted loop, timed as
    (T(passes) - T(1)) / (passes - 1): the device's own rate, without the host's dispatch and sync."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for f, moved in ((jax.jit(lambda a: a * 1.0001), 2 * x.nbytes), (jax.jit(jnp.sum), x.nbytes)):
        best = max(best, moved / _median_s(f, x, runs))

    def copies(k):  # each pass reads and writes x, and needs the previous pass: nothing fuses or is hoisted
        return jax.jit(lambda a: jax.lax.fori_loop(0, k, lambda i, b: b * 1.0001, a))

    per_pass = (_median_s(copies(passes), x, runs) - _median_s(copies(1), x, runs)) / (passes - 1)
    return max(best, 2 * x.nbytes / per_pass) if per_pass > 0 else best


def hbm_bandwidth() -> float | None:
    """Measured device memory bandwidth on a GPU (None on CPU): :func:`measured_bandwidth` over 2 GiB."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu":
        return None
    x = jnp.ones((512 * 2**20,), jnp.float32)  # 2 GiB
    best = measured_bandwidth(x)
    del x
    return best


def decode_step_bytes(cfg, dtype_bytes: int, batch: int, kv_len: float, cache_len: int | None = None) -> dict:
    """Bytes a decode step must read: every weight once (the tied embedding once, as the LM head; an untied
    embedding table only for its ``batch`` looked-up rows) + the KV cache.

    ``kv_len``: filled KV slots per row, of which a query reads at most the sliding window (the minimum any decoder
    reads); ``cache_len``: slots our decoder actually reads (its static cache), when different.
    """
    params = cfg.num_params() - (0 if cfg.tie_embeddings else (cfg.vocab_size - batch) * cfg.hidden_size)
    weights = params * dtype_bytes
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    kv_len = min(kv_len, cfg.sliding_window or kv_len)
    out = {"weight_bytes": weights, "kv_bytes_min": batch * kv_len * per_slot}
    if cache_len is not None:
        out["kv_bytes_read"] = batch * cache_len * per_slot
    return out


def roofline(cfg, dtype_bytes: int, batch: int, prompt_len: float, new: int, cache_len: int, step_s: float,
             bandwidth: float | None, spec: float | None = None) -> dict:
    """HBM roofline of one decode step: minimal bytes (weights + filled KV, mid-generation) / bandwidth / step time;
    with the datasheet bandwidth ``spec`` too (``roofline_fraction_of_spec``)."""
    b = decode_step_bytes(cfg, dtype_bytes, batch, prompt_len + new / 2, cache_len)
    out = dict(b)
    if bandwidth:
        ideal_s = (b["weight_bytes"] + b["kv_bytes_min"]) / bandwidth
        out.update(bandwidth=bandwidth, ideal_step_s=ideal_s, roofline_fraction=ideal_s / step_s)
    if spec:
        spec_s = (b["weight_bytes"] + b["kv_bytes_min"]) / spec
        out.update(spec_bandwidth=spec, spec_step_s=spec_s, roofline_fraction_of_spec=spec_s / step_s)
    return out


def with_step_time(roof: dict, step_s: float) -> dict:
    """``roof`` (a :func:`roofline` result) for another step time: the same bytes and bandwidths."""
    out = dict(roof)
    if "ideal_step_s" in out:
        out["roofline_fraction"] = out["ideal_step_s"] / step_s
    if "spec_step_s" in out:
        out["roofline_fraction_of_spec"] = out["spec_step_s"] / step_s
    return out


def step_time(full: float, one: float, new: int, batches: int, side: str) -> float:
    """Seconds per decode step: (the ``new``-token run - the 1-token run) / (new - 1) / batches; NaN, said on
    stderr, when the longer run was not slower (noise swamped the steps: a busy machine, or too few tokens)."""
    if not full > one:  # also NaN when the 1-token runs were skipped (--no-ttft)
        if one == one:
            print(f"warning: {side}: the {new}-token run ({full:.3f} s) was not slower than the 1-token run "
                  f"({one:.3f} s); no ms/step (a busy machine, or too few new tokens)", file=sys.stderr)
        return float("nan")
    return (full - one) / max(new - 1, 1) / batches


def run_ours(args, cfg, folder, prompts) -> dict:
    import jax
    import numpy as np

    from cancerllm_jax.decode import bucket_length

    t0 = time.perf_counter()
    lm = load_ours(args, cfg, folder)
    load_s = time.perf_counter() - t0
    from cancerllm_jax.decode import Decoder

    choice = {"auto": "auto", "yes": True, "no": False}
    decoder = Decoder(lm, unstack=choice[args.unstack], share_prefix=choice[args.share_prefix])
    kw = dict(eos_id=[], batch_size=args.batch)

    def timed(new):
        t0 = time.perf_counter()
        out = decoder.generate(prompts, max_new_tokens=new, **kw)
        return time.perf_counter() - t0, out

    compile_s, _ = timed(args.new)  # compiles (and runs once)
    compile1_s, _ = timed(1) if args.ttft else (0.0, None)
    t_full, t_one = [], []
    out = None
    for _ in range(args.repeats):
        dt, out = timed(args.new)
        t_full.append(dt)
        if args.ttft:
            t_one.append(timed(1)[0])
    full = statistics.median(t_full)
    one = statistics.median(t_one) if t_one else float("nan")
    n_batches = -(-len(prompts) // args.batch)
    step_s = step_time(full, one, args.new, n_batches, "ours")
    res = {"tokens_per_s": len(prompts) * args.new / full, "total_s": full, "ttft_s": one / n_batches,
           "ms_per_step": 1e3 * step_s, "compile_s": compile_s - full, "compile_1tok_s": compile1_s - one,
           "batches": n_batches, "load_s": load_s, "peak_rss": bt.rss_peak(), "backend": jax.default_backend(),
           "runs": {"full_s": t_full, "one_s": t_one}, "tokens": out,
           "attention": lm.model.attention_impl(), "unstack": decoder.unstack,
           "share_prefix": decoder.share_prefix}
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        res["device_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0))
        plen = bucket_length(max(len(p) for p in prompts))
        width, bandwidth, spec = (np.dtype(args.dtype).itemsize if args.dtype != "bfloat16" else 2, hbm_bandwidth(),
                                  hbm_spec(jax.devices()[0].device_kind))
        mean_len = statistics.mean(len(p) for p in prompts)
        res["roofline"] = roofline(cfg, width, min(args.batch, len(prompts)), mean_len, args.new, plen + args.new,
                                   step_s, bandwidth, spec)
        # what a one-prompt-at-a-time step reads (one row of KV cache), for that side's fraction
        res["roofline_one_row"] = roofline(cfg, width, 1, mean_len, args.new, plen + args.new, step_s, bandwidth,
                                           spec)
    return res


def load_ours(args, cfg, folder):
    import cancerllm_jax as cj

    if folder:
        return cj.load(folder, dtype=args.dtype, attention=args.attention)
    from cancerllm_jax import sharding
    from cancerllm_jax.api import LM
    from cancerllm_jax.model import model_from_params

    params = bt.random_params(cfg, args.dtype)
    model = model_from_params(cfg, params, dtype=args.dtype, attention=args.attention)
    return LM(model, cfg, None, sharding.make_mesh((1, 1)), source=args.preset)


# ----------------------------------------------------------------------------------------------------------- HF

def load_hf(args, cfg, folder):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=tdt, local_files_only=True)
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(bt.hf_config(cfg), dtype=tdt)
    model.to(dev).eval()
    # plain greedy: none of the folder's generation defaults (a repetition penalty, suppressed tokens, ...), and no
    # EOS: exactly `new` tokens, like ours with eos_id=[]
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model, dev


def hf_generate(model, dev, rows: list[list[int]], new: int) -> list[list[int]]:
    """Greedy, left-padded batch; returns the generated ids per row."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def run_hf(args, cfg, folder, prompts, batched: bool) -> dict:
    import torch

    t0 = time.perf_counter()
    model, dev = load_hf(args, cfg, folder)
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bs = args.batch if batched else 1
    chunks = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]

    def timed(new):
        out = []
        sync()
        t0 = time.perf_counter()
        for c in chunks:
            out += hf_generate(model, dev, c, new)
        sync()
        return time.perf_counter() - t0, out

    hf_generate(model, dev, chunks[0], 2)  # warm-up (allocator, kernels)
    t_full, t_one = [], []
    out = None
    for _ in range(args.hf_repeats):
        dt, out = timed(args.new)
        t_full.append(dt)
        if args.ttft:
            t_one.append(timed(1)[0])
    full = statistics.median(t_full)
    one = statistics.median(t_one) if t_one else float("nan")
    step_s = step_time(full, one, args.new, len(chunks), "transformers")
    res = {"tokens_per_s": len(prompts) * args.new / full, "total_s": full, "ttft_s": one / len(chunks),
           "ms_per_step": 1e3 * step_s, "batches": len(chunks), "load_s": load_s, "peak_rss": bt.rss_peak(),
           "backend": dev,
           "runs": {"full_s": t_full, "one_s": t_one}, "tokens": out, "threads": torch.get_num_threads()}
    if dev == "cuda":
        res["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return res


# --------------------------------------------------------------------------------------------------------- main

def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    exact = sum(a == b for a, b in zip(ours, ref))
    prefix = total = 0
    for a, b in zip(ours, ref):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
        total += len(b)
    return {"prompts_identical": exact, "prompts": len(ref), "tokens_before_divergence": prefix,
            "tokens": total, "token_agreement": prefix / max(total, 1)}


def child(args) -> dict:
    folder = bt.smollm2_folder(args.smollm2_dir) if args.preset == "smollm2-135m" else None
    cfg = bt.model_config(args.preset, folder)
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = json.load(f)
    if args.only == "ours":
        return run_ours(args, cfg, folder, prompts)
    return run_hf(args, cfg, folder, prompts, batched=args.only == "hf-batched")


def make_prompts(args) -> list[list[int]]:
    if args.preset == "smollm2-135m":
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.smollm2_dir)
    else:
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(None)  # the Mistral v1 SentencePiece model
    return clinical_prompts(tok, args.prompts, args.prompt_tokens, task=args.task, fill=args.fill)


def fmt_mem(r):
    return bt.fmt_mem(r)


def _ms_step(r: dict) -> str:
    return f"{r['ms_per_step']:.1f}" if r["ms_per_step"] == r["ms_per_step"] else "-"  # NaN: not measurable


def table(res: dict) -> str:
    lines = [f"{'side':<14}{'tok/s':>9}{'total s':>9}{'TTFT ms':>10}{'ms/step':>10}{'memory':>18}{'compile s':>11}"
             f"{'roofline':>10}"]
    for side, r in res.items():
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        roof = r.get("roofline", {}).get("roofline_fraction")
        roof = f"{100 * roof:.1f}%" if roof and roof == roof else "-"
        ttft = f"{1e3 * r['ttft_s']:.1f}" if r["ttft_s"] == r["ttft_s"] else "-"  # NaN: --no-ttft
        lines.append(f"{side:<14}{r['tokens_per_s']:>9.1f}{r['total_s']:>9.2f}{ttft:>10}"
                     f"{_ms_step(r):>10}{fmt_mem(r):>18}{comp:>11}{roof:>10}")
    return "\n".join(lines)


def append_doc(args, res, agree, command, mach, load, ratios: dict | None = None) -> None:
    def cell(r):
        if not r:
            return "-"
        if r["ttft_s"] == r["ttft_s"]:  # not NaN (--no-ttft skips the 1-token runs)
            s = f"{r['tokens_per_s']:.1f} tok/s, TTFT {1e3 * r['ttft_s']:.0f} ms, {_ms_step(r)} ms/step"
        else:
            s = f"{r['tokens_per_s']:.1f} tok/s, total {r['total_s']:.1f} s"
        if "compile_s" in r:
            s += f", compile {r['compile_s']:.1f} s"
        roof = r.get("roofline", {}).get("roofline_fraction")
        if roof and roof == roof:
            s += f", roofline {100 * roof:.1f}%"
            spec = r["roofline"].get("roofline_fraction_of_spec")
            s += f" ({100 * spec:.1f}% of the spec bandwidth)" if spec and spec == spec else ""
        return s

    o, s, b = res.get("ours"), res.get("hf-single"), res.get("hf-batched")
    r1 = f"{o['tokens_per_s'] / s['tokens_per_s']:.1f}×" if o and s else "-"
    r2 = f"{o['tokens_per_s'] / b['tokens_per_s']:.2f}×" if o and b else "-"
    r1 += bt.rounds_note((ratios or {}).get("hf-single"))
    r2 += bt.rounds_note((ratios or {}).get("hf-batched"))
    ag = (f"{agree['prompts_identical']}/{agree['prompts']} prompts, {100 * agree['token_agreement']:.1f}% tokens"
          if agree else "-")
    busy = bt.contention_note(res)
    row = (f"| {datetime.date.today().isoformat()} | {mach} (load {load}{busy}) | `{bt.md_cell(command)}` | "
           f"{cell(o)} | {cell(s)} | {cell(b)} | {r1} | {r2} | {ag} | {bt.md_cell(args.note or '')} |\n")
    header = "## Greedy generation (tools/bench_decode.py)"
    cols = ("| date | machine | command | ours (JAX, batched) | HF generate, one at a time | HF generate, batched | "
            "ours / one-at-a-time | ours / batched | greedy agreement | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    bt.append_row(header, cols, row)


def combine_rounds(rounds: list[dict], n_prompts: int, new: int) -> dict:
    """One side's results from several rounds as one: total time, TTFT and ms/step from the medians over every
    round's timed runs (the roofline fraction rescaled to that step time), the worst round's peak memory, the
    median compile time, and each round's own total under ``round_total_s``."""
    if len(rounds) == 1:
        return rounds[0]
    full_s = [t for r in rounds for t in r["runs"]["full_s"]]
    one_s = [t for r in rounds for t in r["runs"]["one_s"]]
    full = statistics.median(full_s)
    one = statistics.median(one_s) if one_s else float("nan")
    batches = rounds[0]["batches"]
    step_s = step_time(full, one, new, batches, "the rounds")
    out = dict(rounds[0])
    out.update(total_s=full, tokens_per_s=n_prompts * new / full, ttft_s=one / batches, ms_per_step=1e3 * step_s,
               runs={"full_s": full_s, "one_s": one_s}, rounds=len(rounds),
               round_total_s=[r["total_s"] for r in rounds])
    bt.merge_round_costs(out, rounds)
    if "roofline" in out:
        out["roofline"] = with_step_time(out["roofline"], step_s)
    return out


def main(argv=None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=("smollm2-135m", "mistral-7b", "tiny"), default="smollm2-135m")
    p.add_argument("--prompts", type=bt.positive_int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=bt.positive_int, default=16)
    p.add_argument("--prompt-tokens", type=bt.positive_int, default=128,
                   help="token budget of every prompt (incl. BOS)")
    p.add_argument("--task", choices=("phenotype", "diagnosis", "treatment_plan"),
                   help="only this task's questions (default: all tasks, round-robin)")
    p.add_argument("--fill", action="store_true",
                   help="lengthen every context with further notes so each prompt is --prompt-tokens long")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weights and compute (default: bfloat16 for mistral-7b, float32 otherwise)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="our attention in the prompt block: auto = cuDNN on a GPU in bf16, else the einsum")
    p.add_argument("--unstack", choices=("auto", "yes", "no"), default="auto",
                   help="per-layer weights in our decode loop (auto: where the device holds the layer weights 4x)")
    p.add_argument("--share-prefix", choices=("auto", "yes", "no"), default="auto",
                   help="prefill the prompts' common prefix once per batch (auto: with the einsum attention)")
    p.add_argument("--no-ttft", dest="ttft", action="store_false",
                   help="skip the 1-token runs on every side (no TTFT / ms-per-step split; halves a long run)")
    p.add_argument("--repeats", type=bt.positive_int, default=3, help="timed runs of ours (median)")
    p.add_argument("--hf-repeats", type=bt.positive_int, default=1,
                   help="timed runs of each transformers side (median)")
    p.add_argument("--only", action="append", choices=SIDES, help="run only these sides (repeatable)")
    p.add_argument("--rounds", type=bt.positive_int, default=1,
                   help="run the sides this many times, reversing their order every other round, and report the "
                        "medians over every round's runs (and each round's ratios)")
    p.add_argument("--torch-host-malloc", choices=("system", "keep"), default="system", help=bt.TORCH_MALLOC_HELP)
    p.add_argument("--smollm2-dir")
    p.add_argument("--json")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--note")
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be >= 2")
    bt.check_smollm2_dir(p, args)
    bt.check_json_out(p, args.json)
    bt.resolve_dtype_and_attention(p, args)

    if args.child_out:
        args.only = args.only[0]
        res = child(args)
        with open(args.child_out, "w", encoding="utf-8") as f:
            json.dump(res, f)
        return 0

    if args.preset == "smollm2-135m":
        args.smollm2_dir = bt.smollm2_folder(args.smollm2_dir)
    sides = list(dict.fromkeys(args.only)) if args.only else (
        list(SIDES) if args.preset == "smollm2-135m" else ["ours"])  # a side named twice runs once
    from cancerllm_jax.errors import UserError

    try:
        prompts = make_prompts(args)
    except UserError as e:  # e.g. a --prompt-tokens budget too small for the prompt template
        p.error(str(e))
    raw_argv = list(argv or sys.argv[1:])
    command = "python tools/bench_decode.py " + " ".join(shlex.quote(a) for a in raw_argv)
    tmpdir = tempfile.mkdtemp(prefix="bench-decode-")
    pfile = os.path.join(tmpdir, "prompts.json")
    with open(pfile, "w", encoding="utf-8") as f:
        json.dump(prompts, f)
    bt.warn_if_busy()
    load_before = bt.load_avg()

    def run_one(side, label):
        out = os.path.join(tmpdir, f"{side}.json")
        cmd = [sys.executable, os.path.abspath(__file__), *[a for a in raw_argv], "--prompts-file", pfile,
               "--child-out", out]
        cmd = _strip_only(cmd) + ["--only", side]  # the child runs exactly one side
        return bt.run_side(cmd, label, out, args.smollm2_dir, args.torch_host_malloc if side != "ours" else None)

    try:
        per_round, failed = bt.run_rounds(args.rounds, sides, run_one)  # a failed side is reported, the others run
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)  # the prompts and the sides' results, read by now
    res = {side: combine_rounds(r, len(prompts), args.new) for side, r in per_round.items()}
    if "roofline" in res.get("ours", {}):  # the bytes a step must read, against the bandwidth ours measured: the
        # batched sides read ours' rows of KV cache, the one-at-a-time side one row
        for side, r in res.items():
            if side != "ours" and r["ms_per_step"] == r["ms_per_step"]:
                roof = res["ours"]["roofline_one_row" if side == "hf-single" else "roofline"]
                r["roofline"] = with_step_time(roof, r["ms_per_step"] / 1e3)
    res.get("ours", {}).pop("roofline_one_row", None)  # one row's bytes against ours' batched step: no fraction
    ratios = {ref: bt.round_ratios(per_round, ref) for ref in ("hf-single", "hf-batched")}
    if not res:
        return failed
    failed_sides = bt.note_failed(args, sides, res)
    load = f"{load_before} → {bt.load_avg()}"
    mach = bt.machine()
    agree = None
    if "ours" in res and "hf-single" in res and args.preset == "smollm2-135m":
        agree = agreement(res["ours"]["tokens"], res["hf-single"]["tokens"])
    lens = [len(p) for p in prompts]
    print(f"machine: {mach}; load avg {load}{bt.contention_note(res)}")
    print(f"preset {args.preset}, {len(prompts)} prompts ({min(lens)}..{max(lens)} tokens, budget "
          f"{args.prompt_tokens}), {args.new} new tokens each (EOS ignored), batch {args.batch}, dtype {args.dtype}")
    print(table(res))
    if "ours" in res and "hf-single" in res:
        print(f"ours / HF one at a time: {res['ours']['tokens_per_s'] / res['hf-single']['tokens_per_s']:.1f}x")
    if "ours" in res and "hf-batched" in res:
        print(f"ours / HF batched: {res['ours']['tokens_per_s'] / res['hf-batched']['tokens_per_s']:.2f}x")
    for ref, rs in ratios.items():
        if rs:
            print(f"ours / {ref} per round: " + ", ".join(f"{r:.2f}x" for r in rs))
    if agree:
        print(f"greedy agreement with HF (one at a time): {agree['prompts_identical']}/{agree['prompts']} prompts "
              f"identical, {100 * agree['token_agreement']:.1f}% of tokens before the first divergence")
    if "hf-single" in res and "hf-batched" in res:
        a2 = agreement(res["hf-batched"]["tokens"], res["hf-single"]["tokens"])
        print(f"(HF batched vs HF one at a time: {a2['prompts_identical']}/{a2['prompts']} prompts identical)")
    out = {"preset": args.preset, "prompts": len(prompts), "prompt_lengths": lens, "new": args.new,
           "batch": args.batch, "dtype": args.dtype, "machine": mach, "load": load, "command": command,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "results": res, "agreement": agree}
    if any(ratios.values()):
        out["round_ratios"] = {ref: rs for ref, rs in ratios.items() if rs}
    if failed_sides:
        out["failed_sides"] = failed_sides
    if args.json:
        bt.write_json(args.json, out)
    if not args.no_doc:
        append_doc(args, res, agree, command, mach, load, ratios)
    return failed


def _strip_only(cmd: list[str]) -> list[str]:
    out, skip = [], False
    for c in cmd:
        if skip:
            skip = False
            continue
        if c == "--only":
            skip = True
            continue
        if c.startswith("--only="):
            continue
        out.append(c)
    return out


if __name__ == "__main__":
    sys.exit(main())
