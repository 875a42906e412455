#!/usr/bin/env python
"""Batched generation over a JSONL file.

    python launch/generate.py --model PATH [--adapter PEFT_DIR] --input prompts.jsonl --out predictions.jsonl
                              [--max-new-tokens 64]

Each input line has either ``prompt`` (used as is) or ``instruction`` [+ ``context``] (rendered with the
authors' Alpaca template). Each output line: ``id``, ``prompt_hash`` and ``prediction`` (the generated text up to
EOS or a --stop string, without leading and trailing whitespace, as evaluate.py writes it), plus ``response`` as
``gold`` when the input has one. The output file appears complete or not at all: until then each finished batch
is appended to a hidden ``.OUT.partial.jsonl`` beside it, and a run started again with the same flags on the same
input and model resumes from it (rows made with other settings are discarded with ``--overwrite``, else refused).
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import UserError, cli_main, describe_os_error
from cancerllm_jax.launch_common import check_decode_flags, mesh_value_joined, start_runtime


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
                   help="sampling seed; each input line draws its own stream from it and the line's id (its line "
                        "number where it has none; as evaluate.py run), so a line's sample does not depend on the "
                        "other lines, their order, the batch size or skipped lines (logits that differ in the last "
                        "bits between batch shapes can still tip an exact near-tie)")
    p.add_argument("--stop", action="append", help="stop string (repeatable, not empty)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out; rows an interrupted run made with other settings, or that are "
                        "no prompt of --input, are discarded (its rows made as now are resumed)")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(mesh_value_joined(argv))


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
        # named as long as the longest hidden file beside --out will be (the settings record's temp file)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=f"..{os.path.basename(args.out)}.partial.json.tmp-")
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

    # ids as scoring reads them: unique; a line without one is line<N>, as `evaluate.py run` names it
    rows_by_id(args.input, [(r["_line"], r) for r in records], implicit=True)
    partial = _Partial(out_dir, args)
    from cancerllm_jax.train.run_io import FolderLock

    with FolderLock(out_dir, "--out", name=f".{os.path.basename(args.out)}.lock", target=args.out):
        if os.path.exists(args.out) and not args.overwrite:  # another command may have finished it meanwhile
            raise UserError(f"{args.out} exists; pass --overwrite to replace it")
        partial.remove_stale_temp_files()  # a killed command's; none is being written: we hold the lock
        try:
            return _generate(args, records, skipped, partial)
        except BaseException:
            if not partial.has_rows():  # nothing to resume from: leave no hidden files behind
                partial.remove()
            raise


def _generate(args, records: list, skipped: int, partial) -> int:
    start_runtime(argparse.Namespace(coordinator=None, num_processes=None, process_id=None), args.mesh,
                  cluster_env=False)  # one process; a launcher's task variables are for the training launchers
    partial.check_settings()  # before the model is read: other settings are refused at once
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
    # raw prompts the decoder cuts (contexts were cut to fit already), counted over every line, as `cut` is
    raw_cut = sum(len(p) > args.max_prompt_tokens for p in prompts) if args.max_prompt_tokens else 0
    from cancerllm_jax.eval.runner import instance_seed
    from cancerllm_jax.eval.tasks import line_id, prompt_hash

    keys = [str(r.get("id", line_id(r["_line"]))) for r in records]
    hashes = [prompt_hash(t) for t in texts]
    done = partial.resume(dict(zip(keys, hashes, strict=True)))
    # longest first (as the prompt is fed: cut to --max-prompt-tokens), as one generate call over all of them
    # batches them, so a resumed run decodes the rest in the batches it would have
    fed = [min(len(p), args.max_prompt_tokens) if args.max_prompt_tokens else len(p) for p in prompts]
    todo = sorted((i for i in range(len(records)) if keys[i] not in done), key=lambda i: -fed[i])
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    if done:
        print(f"resuming: {len(done)} of {len(records)} predictions already made ({partial.rows})", file=sys.stderr)
    from tqdm import tqdm

    from cancerllm_jax.decode import generated_text

    totals = {"generated_tokens": 0, "time_s": 0.0}
    for batch in tqdm(batches, unit="batch", desc="generate", disable=not batches):
        # seeds per input line, from its id: a line's sample does not depend on the others, their order, the batch
        # or a resume
        outs = lm.generate([prompts[i] for i in batch], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=[instance_seed(args.seed, keys[i]) for i in batch],
                           max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size)
        for k in totals:
            totals[k] += lm._decoder.last_stats[k]
        rows = [{"id": keys[i], "prompt_hash": hashes[i], "gold": "",
                 "prediction": generated_text(lm.tokenizer, gen, lm.eos_ids, args.stop or ()).strip()}
                for i, gen in zip(batch, outs, strict=True)]
        partial.append(rows)
        done.update((r["id"], r["prediction"]) for r in rows)
    _write_output(args, records, keys, hashes, done, before_rename=partial.remove)
    speed = totals["generated_tokens"] / max(totals["time_s"], 1e-9)
    print(f"wrote {len(records)} predictions to {args.out}"
          f"{f' ({len(records) - len(todo)} from the interrupted run)' if len(todo) < len(records) else ''}: "
          f"{totals['generated_tokens']} tokens in {totals['time_s']:.1f} s ({speed:.1f} tok/s); {cut} contexts "
          f"truncated, {raw_cut} raw prompts cut to their last {args.max_prompt_tokens} tokens, "
          f"{skipped} bad lines skipped", file=sys.stderr)
    return 0


class _Partial:
    """The hidden, resumable state of one ``--out``: ``.OUT.partial.jsonl`` (a row per finished prompt, appended and
    fsynced batch by batch) and ``.OUT.partial.json`` (what decides the predictions: input, model, settings)."""

    FORMAT = 1

    def __init__(self, out_dir: str, args):
        base = os.path.basename(args.out)
        self.rows = os.path.join(out_dir, f".{base}.partial.jsonl")
        self.meta = os.path.join(out_dir, f".{base}.partial.json")
        self.args = args

    def settings(self) -> dict:
        from cancerllm_jax.eval.runner import adapter_fingerprint, model_fingerprint
        from cancerllm_jax.model import resolve_dtype

        a = self.args
        with open(a.input, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        greedy = a.temperature <= 0
        adapter = a.adapter if a.adapter not in (None, "", "none") else None
        return {"format": self.FORMAT, "input": os.path.realpath(a.input), "input_sha256": digest,
                "model": model_fingerprint(a.model), "adapter": adapter_fingerprint(adapter) if adapter else None,
                "dtype": resolve_dtype(a.dtype).name, "max_new_tokens": a.max_new_tokens,
                "max_prompt_tokens": a.max_prompt_tokens,
                "temperature": 0.0 if greedy else a.temperature, "top_k": None if greedy else a.top_k,
                "top_p": None if greedy else a.top_p, "seed": None if greedy else a.seed,
                "stop": list(a.stop or ()), "skip_bad_lines": a.skip_bad_lines}

    def check_settings(self) -> None:
        """Keep what an interrupted run made with these settings (with or without --overwrite, which replaces
        --out); rows made otherwise are refused, or discarded with --overwrite. Records the settings for the rows
        to come."""
        from cancerllm_jax.eval.runner import differences, read_json_file

        want = self.settings()
        if self.has_rows():
            fix = "pass --overwrite to discard it and start over"
            problem = None
            if not os.path.isfile(self.meta):
                problem = (f"{self.rows}: an interrupted run's predictions without the record of what made them "
                           f"({self.meta} is missing)")
            else:
                try:
                    have = read_json_file(self.meta, "record of what made the predictions", fix)
                except (UserError, OSError) as e:
                    have = e
                if have != want:
                    what = ("; ".join(differences(have, want)) if isinstance(have, dict)
                            else f"its record is unreadable: {have}")
                    problem = (f"{self.rows}: an interrupted run left predictions made with other input, model or "
                               f"settings ({what}); run it again as it was to finish it")
            if problem is None:
                return
            if not self.args.overwrite:
                raise UserError(f"{problem}; or {fix}")
        self._restart(want)

    def _restart(self, settings: dict | None = None) -> None:
        """No rows, and the record of the settings the rows to come are made with."""
        from cancerllm_jax.train.run_io import write_json_atomic

        self.remove()
        write_json_atomic(self.meta, settings or self.settings())

    def has_rows(self) -> bool:
        return os.path.isfile(self.rows) and os.path.getsize(self.rows) > 0

    def resume(self, expected: dict[str, str]) -> dict[str, str]:
        """``{id: prediction}`` of the rows already made (an interrupted last line is cut off and made again)."""
        from cancerllm_jax.eval.runner import read_predictions

        done = {}
        for row in read_predictions(self.rows, allow_torn_tail=True):
            if expected.get(row["id"]) != row["prompt_hash"]:
                where = (f"{self.rows}:{row['_line']}: id {row['id']!r} is not a prompt of {self.args.input} as it "
                         "reads now")
                if not self.args.overwrite:
                    raise UserError(f"{where}; pass --overwrite to discard the interrupted run and start over")
                print(f"warning: {where}: --overwrite: the interrupted run's rows are discarded", file=sys.stderr)
                self._restart()
                return {}
            done[row["id"]] = row["prediction"]
        return done

    def append(self, rows: list[dict]) -> None:
        from cancerllm_jax.eval.runner import _append_jsonl

        _append_jsonl(self.rows, rows)

    def remove(self) -> None:
        for path in (self.rows, self.meta):
            if os.path.exists(path):
                os.remove(path)

    def remove_stale_temp_files(self) -> None:
        """The temp files a killed command left for this ``--out`` (the output's and the settings record's)."""
        import re

        folder = os.path.dirname(self.rows)
        base = re.escape(os.path.basename(self.args.out))
        for name in os.listdir(folder):  # exactly this --out's (another's name may start with this one's)
            if re.fullmatch(rf"\.{base}\.tmp-\d+|\.\.{base}\.partial\.json\.tmp-\d+", name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


def _write_output(args, records: list, keys: list, hashes: list, predictions: dict, before_rename=None) -> None:
    """The predictions in input order, written beside ``--out`` and renamed onto it (complete or not at all);
    ``before_rename`` runs once the file is complete and synced (removing the partial: a kill then leaves a temp
    file, never a complete output beside the rows it was made from)."""
    out_dir = os.path.dirname(os.path.abspath(args.out))
    tmp = os.path.join(out_dir, f".{os.path.basename(args.out)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r, key, h in zip(records, keys, hashes, strict=True):
                # a line without an id is line<N>, as evaluate.py names it: `score` pairs it with its gold by id
                row = {"id": r.get("id", key), "prompt_hash": h, "prediction": predictions[key]}
                if "response" in r:
                    row["gold"] = r["response"]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # disk full, interrupted: no partial file is left behind
        raise


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


if __name__ == "__main__":
    sys.exit(main())
