#!/usr/bin/env python3
"""Compare our forward pass with transformers' on the same HF weights; run it after every conversion.

    python tools/check_parity.py --hf-dir DIR [--prompts FILE] [--dtype float32] [--tol 1e-3] [--json OUT]

Prints per prompt max |Δlogit|, mean KL(ref‖ours) and argmax agreement; exits 1 past ``--tol`` or on any argmax
disagreement (``--min-agree`` relaxes that, e.g. for bf16). ``FILE``: one prompt per line, or JSONL with ``text``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from bench_train import check_json_out, json_safe  # noqa: E402  (the tools' one --json check)

from cancerllm_jax.errors import UserError, cli_main

DEFAULT_PROMPTS = (
    "The patient is a 62-year-old woman with stage IIA invasive ductal carcinoma, ER+/PR+, HER2-.",
    "Assessment: metastatic nsclc with mets to the liver; plan is carboplatin and pemetrexed.",
    "Pathology: prostate adenocarcinoma, Gleason score 4+3=7, margins negative, pT2N0.",
    "Radiation oncology consult for 25 Gy in 5 fractions to the right lung lesion.",
    "Diagnosis: diffuse large B-cell lymphoma. Treatment plan: R-CHOP for six cycles.",
)


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a text file (one per line) or JSONL with a ``text`` field; the built-ins when ``path`` is None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    if not os.path.isfile(path):
        raise UserError(f"prompts file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise UserError(f"{path}:{n}: a JSONL line needs a non-empty string field 'text'")
            out.append(row["text"])
        else:
            out.append(line)
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def compare_logits(ref: np.ndarray, ours: np.ndarray) -> dict:
    """max |Δlogit|, mean KL(ref‖ours) over positions and argmax agreement (%) for ``[T, V]`` logits."""
    from scipy.special import log_softmax

    ref, ours = ref.astype(np.float64), ours.astype(np.float64)
    lp, lq = log_softmax(ref, axis=-1), log_softmax(ours, axis=-1)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    finite = np.isfinite(ref).all(-1) & np.isfinite(ours).all(-1)  # a NaN row's argmax (0) agrees with nothing
    agree = float(np.mean(finite & (ref.argmax(-1) == ours.argmax(-1))) * 100.0)
    return {"max_abs_diff": float(np.abs(ref - ours).max()), "mean_kl": max(kl, 0.0), "argmax_agree_pct": agree}


def encode_prompts(hf_dir: str, prompts: list[str], vocab_size: int) -> tuple[list[list[int]], str]:
    """Token ids as transformers' tokenizer for the folder makes them (its default special tokens); else our
    tokenizer with BOS; without any tokenizer, deterministic ids from the prompt bytes (noted in the output)."""
    from cancerllm_jax.api import _tokenizer_in

    if not _tokenizer_in(hf_dir):
        return [[b % vocab_size for b in p.encode("utf-8")] for p in prompts], "utf-8 bytes mod vocab (no tokenizer)"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        ids, how = [list(tok(p)["input_ids"]) for p in prompts], "tokenizer"
    except Exception:  # noqa: BLE001 - transformers 5 routes Mistral folders to backends not installed here
        # (mistral_common's, tiktoken); the ids only need to be the same on both sides, so ours encodes them
        from cancerllm_jax.data.tokenizer import load_tokenizer

        ours = load_tokenizer(hf_dir)
        ids, how = [ours.encode(p, bos=True) for p in prompts], "tokenizer"
    bad = [i for x in ids for i in x if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"{hf_dir}: the tokenizer produced id {bad[0]}, outside the model's vocabulary {vocab_size}")
    return ids, how


def reference_logits(hf_dir: str, ids_list: list[list[int]]) -> list[np.ndarray]:
    """transformers fp32 logits (eager attention) for each prompt."""
    from cancerllm_jax.errors import import_reference

    torch = import_reference("torch", "the transformers reference of check_parity.py")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                     local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{hf_dir}: transformers could not load it ({type(e).__name__}: {e})") from None
    out = []
    with torch.no_grad():
        for ids in ids_list:
            out.append(model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy())
    return out


def check(hf_dir: str, prompts: list[str], dtype: str = "float32") -> list[dict]:
    """One result row per prompt: its text's hash (never the text), tokens, max |Δlogit|, mean KL and argmax
    agreement."""
    import cancerllm_jax as cj
    from cancerllm_jax.api import model_kind
    from cancerllm_jax.eval.tasks import prompt_hash

    path, kind = model_kind(hf_dir)
    if kind != "hf":  # transformers reads HF folders only: say so before any model is loaded
        raise UserError(f"{path} is a {'training run' if kind == 'run' else 'converted checkpoint'}, which "
                        f"transformers cannot read: export it with tools/convert_checkpoint.py to-hf first and "
                        f"check that folder")
    lm = cj.load(hf_dir, dtype=dtype)
    ids_list, how = encode_prompts(hf_dir, prompts, lm.cfg.vocab_size)
    refs = reference_logits(hf_dir, ids_list)
    rows = []
    for text, ids, ref in zip(prompts, ids_list, refs):
        ours = lm.logits(np.asarray([ids], np.int32))[0]
        rows.append({"prompt_sha256": prompt_hash(text), "tokens": len(ids), "encoding": how,  # no prompt text
                     **compare_logits(ref, ours)})
    return rows


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="an HF model folder (safetensors)")
    p.add_argument("--prompts", default=None, help="one prompt per line, or JSONL with 'text'")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--tol", type=float, default=1e-3, help="max |Δlogit| allowed per prompt")
    p.add_argument("--min-agree", type=float, default=100.0, help="argmax agreement %% required per prompt")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = p.parse_args(argv)
    if not args.tol >= 0:
        p.error(f"--tol must be a number >= 0 (got {args.tol})")
    if not 0 <= args.min_agree <= 100:
        p.error(f"--min-agree is a percentage in [0, 100] (got {args.min_agree})")
    check_json_out(p, args.json)
    rows = check(args.hf_dir, read_prompts(args.prompts), args.dtype)
    failed = 0
    print(f"{'#':>3} {'tokens':>6} {'max|dlogit|':>12} {'mean KL':>10} {'argmax %':>9}  result")
    for n, r in enumerate(rows, 1):
        ok = r["max_abs_diff"] <= args.tol and r["argmax_agree_pct"] >= args.min_agree
        r["pass"] = ok
        failed += not ok
        print(f"{n:>3} {r['tokens']:>6} {r['max_abs_diff']:>12.3e} {r['mean_kl']:>10.2e} "
              f"{r['argmax_agree_pct']:>8.1f}%  {'PASS' if ok else 'FAIL'}")
    if rows and rows[0]["encoding"] != "tokenizer":
        print(f"note: token ids from {rows[0]['encoding']}")
    summary = {"hf_dir": os.path.abspath(args.hf_dir), "dtype": args.dtype, "tol": args.tol,
               "min_agree": args.min_agree, "failed": failed, "prompts": rows}
    if args.json:
        from cancerllm_jax.train.run_io import write_text_atomic

        write_text_atomic(args.json, json.dumps(json_safe(summary), indent=2, allow_nan=False))
    print(f"{len(rows) - failed}/{len(rows)} prompts within tol {args.tol:g}" + ("" if failed else " — PASS"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
