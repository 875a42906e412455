#!/usr/bin/env python
"""Batched generation over a JSONL file.

    python launch/generate.py --model PATH [--adapter PEFT_DIR] --input prompts.jsonl --out predictions.jsonl
                              [--max-new-tokens 64]

Each input line has either ``prompt`` (used as is) or ``instruction`` [+ ``context``] (rendered with the
authors' Alpaca template). Each output line: ``id``, ``prompt_hash`` and ``prediction`` (plus ``response`` as
``gold`` when the input has one). The output file appears complete or not at all.
"""
import argparse
import json
import os
import sys
import tempfile

import _bootstrap  # noqa: F401

from cancerllm_jax.errors import UserError, cli_main, describe_os_error
from cancerllm_jax.launch_common import check_decode_flags, start_runtime


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, converted checkpoint or training run")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder for --model (adapter_config.json + "
                                     "adapter_model.safetensors), merged into the weights; 'none': no adapter")
    p.add_argument("--input", required=True, help="JSONL with 'prompt' or 'instruction' (+ 'context')")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=1500,
                   help="contexts are cut to fit; raw prompts keep their BOS and last tokens (both counted)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens (default 0: off; transformers' sampling default is 50)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each input line draws its own stream from it and its line number (noise "
                        "per token id), so a line's sample does not depend on the other lines, the batch size or "
                        "skipped lines (logits that differ in the last bits between batch shapes can still tip an "
                        "exact near-tie)")
    p.add_argument("--stop", action="append", help="stop string (repeatable, not empty)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse(argv)
    check_decode_flags(args)
    if any(not s for s in args.stop or ()):
        raise UserError("--stop must not be empty")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; name the output JSONL file")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    if os.path.exists(args.out) and os.path.exists(args.input) and os.path.samefile(args.out, args.input):
        raise UserError(f"--out {args.out} is the --input file; write the predictions elsewhere")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out {args.out}: the folder {out_dir} does not exist; create it first")
    try:  # before any decoding: a folder that cannot be written would lose all of it at the end
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{os.path.basename(args.out)}.probe-")
    except OSError as e:
        raise UserError(f"--out {args.out}: {describe_os_error(e)}") from None
    probe.close()
    from cancerllm_jax.data.sources import read_jsonl

    records, skipped = read_jsonl(args.input, {}, args.skip_bad_lines, optional={
        "prompt": str, "instruction": str, "context": str, "response": str, "id": (str, int)}, line_key="_line")
    records, _, n_bad = _keep_good(records, args.skip_bad_lines, lambda r: _check_fields(args.input, r))
    skipped += n_bad
    if not records:
        raise UserError(f"{args.input}: no usable records ({skipped} bad lines skipped)")
    from cancerllm_jax.eval.protocol import rows_by_id

    rows_by_id(args.input, [(r["_line"], r) for r in records])  # ids as scoring reads them: unique, all or none
    start_runtime(argparse.Namespace(coordinator=None, num_processes=None, process_id=None), args.mesh,
                  cluster_env=False)  # one process; a launcher's task variables are for the training launchers
    import cancerllm_jax as cj

    from cancerllm_jax.api import adapter_or_none

    adapter = adapter_or_none(args.adapter)
    lm = cj.load(args.model, dtype=args.dtype, mesh=args.mesh, adapter=adapter)
    if lm.tokenizer is None:
        raise UserError(f"{args.model}: no tokenizer found beside the weights")
    records, encoded, n_bad = _keep_good(records, args.skip_bad_lines, lambda r: _prompt(
        lm.tokenizer, r, args.max_prompt_tokens, f"{args.input}:{r['_line']}", lm.cfg.bos_token_id))
    skipped += n_bad
    if not records:
        raise UserError(f"{args.input}: no usable records ({skipped} bad lines skipped)")
    prompts, texts, cuts = zip(*encoded, strict=True)
    cut = sum(n > 0 for n in cuts)
    from cancerllm_jax.eval.runner import instance_seed
    from cancerllm_jax.eval.tasks import line_id

    seeds = [instance_seed(args.seed, line_id(r["_line"])) for r in records]  # a skipped line moves no other's
    outs = lm.generate(list(prompts), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=seeds, max_prompt_tokens=args.max_prompt_tokens,
                       batch_size=args.batch_size, progress=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(args.out)}.tmp-{os.getpid()}")
    try:
        _write_predictions(tmp, args, records, texts, outs, lm)
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # disk full, interrupted: no partial file is left behind
        raise
    st = lm._decoder.last_stats
    print(f"wrote {len(records)} predictions to {args.out}: {st['generated_tokens']} tokens in {st['time_s']:.1f} s "
          f"({st['generated_tokens'] / max(st['time_s'], 1e-9):.1f} tok/s); {cut} contexts truncated, "
          f"{st['truncated_prompts']} raw prompts cut to their last {args.max_prompt_tokens} tokens, "
          f"{skipped} bad lines skipped", file=sys.stderr)
    return 0


def _check_fields(path: str, r: dict) -> None:
    from cancerllm_jax.data.instruct import refuse_alpaca_input

    refuse_alpaca_input(f"{path}:{r['_line']}", r)
    if "prompt" not in r and "instruction" not in r:
        raise UserError(f"{path}:{r['_line']}: needs a 'prompt' or an 'instruction' field")
    if "prompt" in r and ("instruction" in r or "context" in r):  # which one was meant? neither is dropped silently
        raise UserError(f"{path}:{r['_line']}: has a 'prompt' and an 'instruction'/'context'; give one or the other")
    if r.get("prompt") == "":  # with a tokenizer that adds a BOS it would encode to the BOS alone
        raise UserError(f"{path}:{r['_line']}: the prompt is empty")
    if "instruction" in r and not (r["instruction"] or "").strip():  # as training refuses it
        raise UserError(f"{path}:{r['_line']}: field 'instruction' is empty")


def _prompt(tokenizer, r: dict, budget: int, where: str, bos: int | None = None) -> tuple[list[int], str, int]:
    """(prompt ids, the text the model sees (hashed into ``prompt_hash``), context tokens cut) for one record; a
    raw ``prompt`` longer than ``budget`` is cut as ``generate`` cuts it (BOS + its last tokens)."""
    from cancerllm_jax.data.instruct import generation_prompt
    from cancerllm_jax.data.tokenizer import encode_written_prompt
    from cancerllm_jax.decode import cut_prompt

    if "prompt" in r:
        ids = encode_written_prompt(tokenizer, r["prompt"], bos=True)  # as tokenizer(text): a chat template's tokens
        if not ids:
            raise UserError(f"{where}: the prompt is empty")
        if budget and len(ids) > budget:  # hashed as what the model sees, as a cut instruction prompt is
            return ids, tokenizer.decode(cut_prompt(ids, budget, bos)), 0
        return ids, r["prompt"], 0
    return generation_prompt(tokenizer, r["instruction"], r.get("context") or "", budget, example_id=where)


def _keep_good(records: list, skip_bad: bool, make) -> tuple[list, list, int]:
    """(the records ``make`` accepts, what it made of them, how many it refused): a refused record is an error,
    or dropped and counted with ``--skip-bad-lines``."""
    kept, made = [], []
    for n, r in enumerate(records):
        try:
            made.append(make(r))
        except UserError as e:
            if not skip_bad:
                raise
            if n - len(kept) < 5:  # the first few refused records, by line (as read_jsonl logs bad lines)
                print(f"warning: skipping {e}", file=sys.stderr)
            continue
        kept.append(r)
    return kept, made, len(records) - len(kept)


def _write_predictions(tmp, args, records, texts, outs, lm) -> None:
    from cancerllm_jax.decode import generated_text
    from cancerllm_jax.eval.tasks import line_id, prompt_hash

    with open(tmp, "w", encoding="utf-8") as f:
        for r, text, gen in zip(records, texts, outs):
            pred = generated_text(lm.tokenizer, gen, lm.eos_ids, args.stop or ()).strip()
            # a line without an id is line<N>, as evaluate.py names it: `score` pairs it with its gold line by id
            row = {"id": r.get("id", line_id(r["_line"])),
                   "prompt_hash": prompt_hash(text), "prediction": pred}
            if "response" in r:
                row["gold"] = r["response"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    sys.exit(main())
