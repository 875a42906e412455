#!/usr/bin/env python3
"""Measure how far our bf16 forward is from the fp32 reference (transformers, fp32) — numbers for docs/parity.md.

    python tools/measure_bf16.py [--smollm2-dir DIR] [--skip-smollm2] [--json OUT]

Models: the ``tiny`` preset's shape with random N(0, 0.02) weights, and SmolLM2-135M-Instruct real weights
(imported from its GGUF into ``~/.cache/cancerllm_jax`` unless ``--smollm2-dir`` is given). For each model and
our dtype (fp32, bf16) it prints max |Δlogit|, mean KL(ref‖ours) and argmax agreement against transformers fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from cancerllm_jax.errors import cli_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import check_json_out, json_safe  # noqa: E402
from check_parity import DEFAULT_PROMPTS, compare_logits


def tiny_folder(out: str) -> str:
    """The ``tiny`` preset's shape as a random HF Mistral (HF's N(0, 0.02) init, random norm weights)."""
    from cancerllm_jax.errors import import_reference

    torch = import_reference("torch", "measure_bf16.py's transformers reference")
    import transformers

    from cancerllm_jax.config import preset

    c = preset("tiny")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                     intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                     num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                     head_dim=c.head_dim, sliding_window=c.sliding_window,
                                     tie_word_embeddings=c.tie_embeddings, max_position_embeddings=4096)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def measure(folder: str, batches: list[np.ndarray]) -> dict:
    """``{dtype: metrics}``: worst max |Δlogit|, mean KL and argmax agreement over ``batches`` vs transformers."""
    from cancerllm_jax.errors import import_reference

    torch = import_reference("torch", "measure_bf16.py's transformers reference")
    from transformers import AutoModelForCausalLM

    import cancerllm_jax as cj

    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        refs = [ref_model(torch.from_numpy(b.astype(np.int64))).logits.numpy() for b in batches]
    out = {}
    for dtype in ("float32", "bfloat16"):
        lm = cj.load(folder, dtype=dtype)
        rows = []
        for ids, ref in zip(batches, refs, strict=True):
            ours = lm.logits(ids)
            rows += [compare_logits(r, o) for r, o in zip(ref, ours, strict=True)]
        out[dtype] = {"max_abs_diff": max(r["max_abs_diff"] for r in rows),
                      "mean_kl": float(np.mean([r["mean_kl"] for r in rows])),
                      "argmax_agree_pct": float(np.mean([r["argmax_agree_pct"] for r in rows])),
                      "ref_logit_absmax": float(max(np.abs(r).max() for r in refs)), "sequences": len(rows)}
    return out


def smollm2_batches(folder: str) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(p, return_tensors="np")["input_ids"].astype(np.int32) for p in DEFAULT_PROMPTS]


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2-dir", default=None, help="an imported SmolLM2 folder (default: import / reuse cache)")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    check_json_out(p, args.json)
    if args.smollm2_dir and not args.skip_smollm2 and not os.path.isfile(os.path.join(args.smollm2_dir,
                                                                                        "config.json")):
        p.error(f"--smollm2-dir {args.smollm2_dir}: no config.json there (make one: python tools/import_gguf.py "
                f"--out {args.smollm2_dir})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 32000, size=(4, 192), dtype=np.int32)  # longer than the window (128)
        results["tiny (random, N(0,0.02)), 4x192 tokens"] = measure(tiny_folder(tmp), [batch])
    if not args.skip_smollm2:
        from cancerllm_jax.checkpoint.gguf import import_gguf

        folder = args.smollm2_dir or import_gguf()
        results["SmolLM2-135M-Instruct, 5 clinical prompts"] = measure(folder, smollm2_batches(folder))
    print("| model | ours dtype | max abs dlogit | mean KL(ref||ours) | argmax agree | ref max abs logit |")
    print("|---|---|---|---|---|---|")
    for name, by_dtype in results.items():
        for dtype, m in by_dtype.items():
            print(f"| {name} | {dtype} | {m['max_abs_diff']:.3e} | {m['mean_kl']:.3e} | "
                  f"{m['argmax_agree_pct']:.1f}% | {m['ref_logit_absmax']:.2f} |")
    if args.json:
        from cancerllm_jax.train.run_io import write_text_atomic

        write_text_atomic(args.json, json.dumps(json_safe(results), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
