#!/usr/bin/env python
"""Evaluate CancerLLM generations with the paper's protocol.

    python launch/evaluate.py score --gold test.jsonl --pred predictions.jsonl [--protocol standard|reference]
                                    [--json scores.json] [--per-instance rows.jsonl]
    python launch/evaluate.py score --pred runner_output.jsonl   # a file carrying both `gold` and `prediction`
    python launch/evaluate.py run --model PATH [--model PATH2 ...] [--name NAME ...] [--adapter PEFT_DIR|none ...]
                                  --tasks phenotype,diagnosis,treatment_plan --data synthetic|DIR|FILE --out OUT
                                  [--limit N] [--batch-size B] [--protocol standard|reference] [--temperature T]
                                  [--max-new-tokens N|task=N,...] [--max-input-tokens N|task=N,...] [--dtype] [--mesh]
                                  [--overwrite]
    python launch/evaluate.py report --out OUT [--protocol reference]   # re-score prediction files, no decoding
    python launch/evaluate.py trust --run mimic=OUT1 --run synth=OUT2 [--json trust.json]   # seed 004's metrics
    python launch/evaluate.py scan --model TUNED --model VANILLA --tasks radonc_modality,radonc_icd10 --out OUT
                                   [--temperatures 0.1,...,1.0] [run's other flags]   # OUT/T<t>/ runs + scan.md

``run`` decodes every (model, task), resuming from OUT/predictions/ when interrupted, and writes OUT/metrics.json,
OUT/report.md and PNG plots. It resumes only predictions made by the same model weights with the same settings
(recorded in OUT/predictions/<model>__<task>.produced_by.json); otherwise it stops with the differences, and
--overwrite discards such predictions and decodes them again. ``scan`` is a run per temperature (OUT/T0.1 …, each
resumable) plus OUT/scan.json, scan.md and scan.png: every score, the highest and median per model, and one-sided
Wilcoxon signed-rank tests of the first --model against each other one, per task and overall (the paper's Table 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package first

from cancerllm_jax.errors import UserError, check_can_write, cli_main
from cancerllm_jax.eval.protocol import PROTOCOLS, score_file
from cancerllm_jax.launch_common import check_decode_flags, mesh_value_joined

ROWS = (("EM", "em"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rougeL"))


def format_table(result: dict[str, Any], protocol: str) -> str:
    """A small text table of P / R / F1 per metric and the Average F1."""
    lines = [f"protocol: {protocol}   instances: {result['n']}", f"{'metric':<8}{'P':>9}{'R':>9}{'F1':>9}"]
    for label, key in ROWS:
        lines.append(f"{label:<8}" + "".join(f"{result[f'{key}_{x}']:9.2f}" for x in ("p", "r", "f1")))
    lines.append(f"{'Avg F1':<8}{'':>18}{result['avg_f1']:9.2f}")
    if protocol == "reference":
        lines.append("(reference protocol, as the published evaluator: the ROUGE-L row is its unigram-set F-measure, "
                     "beta 1.2, and BLEU-2 is COCO-style)")
    return "\n".join(lines)


def _write(flag: str, path: str, text: str) -> None:
    """``path`` complete or not at all (a stopped run leaves no truncated summary)."""
    from cancerllm_jax.errors import describe_os_error
    from cancerllm_jax.train.run_io import write_text_atomic

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as e:
        raise UserError(f"{flag} {path}: {describe_os_error(e)}") from None


def _check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """Before any work: each output can be written where it is named (a file, under a folder that exists or can be
    made and takes files), and names no input file or other output (one of the two would be lost)."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder; name a file")
        check_can_write(path, f"{flag} {path}")
        for in_flag, in_path in inputs.items():
            if in_path and os.path.isfile(path) and os.path.isfile(in_path) and os.path.samefile(path, in_path):
                raise UserError(f"{flag} {path} is the {in_flag} file; write it elsewhere")
        if os.path.realpath(path) in seen:
            raise UserError(f"{flag} and {seen[os.path.realpath(path)]} name the same file {path}")
        seen[os.path.realpath(path)] = flag


def cmd_score(args: argparse.Namespace) -> int:
    """Score a prediction file, print the table, optionally write the summary and per-instance rows."""
    _check_outputs({"--json": args.json, "--per-instance": args.per_instance},
                   {"--gold": args.gold, "--pred": args.pred})
    result = score_file(args.gold, args.pred, protocol=args.protocol, gold_field=args.gold_field,
                        pred_field=args.pred_field, per_instance=args.per_instance is not None)
    rows = result.pop("rows", None)
    print(format_table(result, args.protocol))
    written = []
    try:
        if args.json:
            summary = {"protocol": args.protocol, "gold": args.gold, "pred": args.pred, **result}
            _write("--json", args.json, json.dumps(summary, indent=2) + "\n")
            written.append(args.json)
        if args.per_instance:
            _write("--per-instance", args.per_instance, "".join(json.dumps(row) + "\n" for row in rows or []))
    except BaseException:
        for path in written:  # a failed command leaves neither output, not one of the two
            os.remove(path)
        raise
    return 0


def parse_limits(text: str | None, tasks: list[str], flag: str) -> dict[str, int]:
    """``"64"`` (every task) or ``"diagnosis=64,treatment_plan=128"`` → {task: N}; ``"64,diagnosis=8"``: 8 for
    diagnosis, 64 for the others."""
    if not text:
        return {}
    every, named = None, {}
    for part in text.split(","):
        name, _, value = part.strip().rpartition("=")
        name = name.strip()
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected N or task=N,... with integers") from None
        if n < 1:
            raise UserError(f"{flag}: limits must be at least 1, got {n}")
        if name and name not in tasks:
            raise UserError(f"{flag}: {name!r} is not one of the tasks being run ({', '.join(tasks)})")
        if (name in named) if name else every is not None:
            raise UserError(f"{flag} {text!r}: {name or 'the limit for every task'} is given twice")
        if name:
            named[name] = n
        else:
            every = n
    return {**({t: every for t in tasks} if every is not None else {}), **named}  # task=N wins, in any order


def _run_config(args: argparse.Namespace):
    """The ``RunConfig`` that ``run`` and ``scan`` flags describe (checked before any model loads)."""
    check_decode_flags(args)
    if args.mesh:
        from cancerllm_jax.sharding import ensure_host_devices, parse_mesh

        d, m = parse_mesh(args.mesh)
        ensure_host_devices(d * m)
    from cancerllm_jax.eval.runner import Decoding, RunConfig, model_names
    from cancerllm_jax.eval.tasks import parse_tasks

    specs = parse_tasks(args.tasks)
    names = [s.name for s in specs]
    new = parse_limits(args.max_new_tokens, names, "--max-new-tokens")
    inp = parse_limits(args.max_input_tokens, names, "--max-input-tokens")
    specs = [s.with_limits(inp.get(s.name), new.get(s.name)) for s in specs]
    return RunConfig(models=model_names(args.model, args.name, args.adapter), tasks=specs, data=args.data,
                     out=args.out, limit=args.limit, protocol=args.protocol,
                     decoding=Decoding(temperature=getattr(args, "temperature", 0.0), top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                       shots=args.shots),
                     dtype=args.dtype, mesh=args.mesh or "1x1", tokenizer=args.tokenizer, overwrite=args.overwrite)


def cmd_run(args: argparse.Namespace) -> int:
    """Generate with each model on each task (resuming), score, write metrics.json, report.md and plots."""
    from cancerllm_jax.eval.runner import run

    metrics = run(_run_config(args))
    _print_summary(metrics)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """Run every model on every task at each temperature, then test the first model against the others."""
    from cancerllm_jax.eval.scan import parse_temperatures, run_scan

    temps = parse_temperatures(args.temperatures)
    scan = run_scan(_run_config(args), temps)
    for key, per_task in scan["wilcoxon"].items():
        for task, r in per_task.items():
            print(f"{key:<32} {task:<16} p = {r['p_value']:.4g} (n = {r['n']})"
                  + ("  significant" if r["significant"] else ""))
    print(f"wrote {Path(args.out) / 'scan.json'} and {Path(args.out) / 'scan.md'}")
    return 0


def _print_summary(metrics: dict[str, Any]) -> None:
    models = list(metrics["models"])
    print(f"{'Avg F1':<16}" + "".join(f"{m[:22]:>24}" for m in models))
    for task, by_model in metrics["results"].items():
        print(f"{task:<16}" + "".join(f"{by_model[m]['avg_f1']:>24.2f}" if m in by_model else f"{'-':>24}"
                                      for m in models))


def cmd_report(args: argparse.Namespace) -> int:
    """Re-score a run folder from its prediction files and rewrite metrics.json and report.md."""
    from cancerllm_jax.eval.runner import rescore

    metrics = rescore(args.out, args.protocol)
    _print_summary(metrics)
    print(f"re-scored with protocol {metrics['protocol']}; wrote {Path(args.out) / 'report.md'}")
    return 0


def _check_run_against_predictions(folder: str, metrics: dict[str, Any]) -> None:
    """Refuse a ``metrics.json`` whose scores its prediction files no longer give (the files edited, re-decoded or
    cut, or the scorer changed since); a folder without its prediction files is used as it is, with a warning."""
    import logging

    from cancerllm_jax.eval.runner import pred_path, rescore
    from cancerllm_jax.eval.trust import SCORE_KEYS

    absent = [pred_path(folder, model, task) for task, by_model in metrics["results"].items() for model in by_model
              if not os.path.isfile(pred_path(folder, model, task))]
    if absent:
        logging.getLogger(__name__).warning("%s: scores not checked against the prediction files (%d absent, e.g. "
                                            "%s)", folder, len(absent), absent[0])
        return
    try:
        fresh = rescore(folder, write=False)["results"]
    except UserError as e:
        raise UserError(f"--run {folder}: its prediction files no longer match the run ({e}); run `evaluate.py run` "
                        "again with the same --out to decode what is missing") from None
    def numbers(result: Any) -> dict[str, float]:  # the scores trust reads: the protocol's and the radonc ones
        extra = result.get("radonc") if isinstance(result.get("radonc"), dict) else {}
        return {**{k: float(result.get(k, float("nan"))) for k in SCORE_KEYS},
                **{f"radonc {k}": float(v) for k, v in extra.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}}

    for task, by_model in metrics["results"].items():
        for model, old in by_model.items():
            was, now = numbers(old), numbers(fresh.get(task, {}).get(model, {}))
            for key in dict.fromkeys([*was, *now]):
                a, b = was.get(key, float("nan")), now.get(key, float("nan"))
                if not (abs(a - b) <= 1e-9 or a != a and b != b):  # NaN in both: the same
                    raise UserError(f"{folder}/metrics.json and its prediction files disagree: {task} / {model} "
                                    f"{key} is {a:.4f} in metrics.json, {b:.4f} from the predictions (the files, or "
                                    "the scorer, changed since the run); re-score with "
                                    f"`evaluate.py report --out {folder}`")


def cmd_trust(args: argparse.Namespace) -> int:
    """Faithfulness, comprehensiveness, generalizability and robustness (seed 004) of each model over run folders."""
    import logging

    from cancerllm_jax.eval.runner import read_json_file
    from cancerllm_jax.eval.trust import check_run, trust_from_runs, trust_warnings

    runs, inputs = {}, {}
    for spec in args.run:
        name, sep, folder = spec.partition("=")  # NAME=FOLDER; a folder alone may hold "=" in its path
        if not sep or not name or os.sep in name:
            name, folder = os.path.basename(os.path.normpath(spec)), spec
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise UserError(f"--run {spec}: {path} not found (a folder written by `evaluate.py run`)")
        if name in runs:
            raise UserError(f"--run: dataset name {name!r} given twice; name them NAME=FOLDER")
        runs[name], inputs[f"--run {spec}"] = read_json_file(path, "metrics file"), path
        try:
            check_run(runs[name])
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        if isinstance(runs[name].get("models"), dict) and isinstance(runs[name].get("tasks"), dict):
            _check_run_against_predictions(folder, runs[name])
    _check_outputs({"--json": args.json}, inputs)
    try:
        trust = trust_from_runs(runs)
    except ValueError as e:  # NaN or partial scores in a metrics.json
        raise UserError(f"--run: {e}") from None
    for warning in trust_warnings(runs, trust):
        logging.getLogger(__name__).warning("%s", warning)
    keys = ("faithfulness", "comprehensiveness", "generalizability", "robustness")
    print(f"{'model':<24}" + "".join(f"{k:>20}" for k in keys) + f"{'tasks':>7}{'task datasets':>15}")
    for model, m in trust.items():
        print(f"{model[:24]:<24}" + "".join("{:>20}".format("-" if m[k] is None else f"{m[k]:.2f}") for k in keys)
              + f"{m['n_tasks']:>7}{m['n_datasets']:>15}")
    if any(m["robustness"] is None for m in trust.values()):
        print("robustness '-': no task of the model was scored on two or more datasets")
    if args.json:
        _write("--json", args.json, json.dumps({"datasets": list(runs), "models": trust}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``score``, ``run``, ``scan``, ``trust`` and ``report``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", parents=[common], help="score a JSONL prediction file against gold answers")
    s.add_argument("--gold", help="gold JSONL (field --gold-field); omit when --pred carries a `gold` field")
    s.add_argument("--pred", required=True, help="prediction JSONL (field --pred-field)")
    s.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="metric choices (default: standard)")
    s.add_argument("--gold-field", help="gold text field: default `response` in --gold (else the first of gold, "
                                        "answer, output, reference, target), `gold` in --pred when there is no --gold")
    s.add_argument("--pred-field", help="prediction field in --pred: default `prediction` (else the first of pred, "
                                        "generation, generated, output, response; not --gold's field)")
    s.add_argument("--json", metavar="OUT", help="write the summary as JSON")
    s.add_argument("--per-instance", metavar="OUT.jsonl", help="write one JSON line of scores per instance")
    s.set_defaults(func=cmd_score)

    r = sub.add_parser("run", parents=[common], help="generate with one or more models on the tasks, then score")
    _run_arguments(r)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("scan", parents=[common],
                       help="a temperature scan (a run per temperature) and one-sided Wilcoxon tests of the first "
                            "--model against each other one (seed 003)")
    _run_arguments(c)
    c.add_argument("--temperatures", help="comma-separated temperatures (default 0.1,0.2,...,1.0); each is a run "
                                          "in OUT/T<t>")
    c.set_defaults(func=cmd_scan)

    t = sub.add_parser("trust", parents=[common],
                       help="trust metrics (seed 004) of each model over run folders, one per dataset")
    t.add_argument("--run", action="append", required=True, metavar="[NAME=]FOLDER",
                   help="an `evaluate.py run` folder evaluated on one dataset; repeat per dataset")
    t.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
    t.set_defaults(func=cmd_trust)

    p = sub.add_parser("report", parents=[common], help="re-score a run folder from its prediction files")
    p.add_argument("--out", required=True, help="a folder written by `run`")
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: the run's protocol")
    p.set_defaults(func=cmd_report)
    return parser


def _run_arguments(r: argparse.ArgumentParser) -> None:
    """The flags ``run`` and ``scan`` share (all but the temperature)."""
    r.add_argument("--model", action="append", required=True,
                   help="HF folder, converted checkpoint or training run; repeat to compare models side by side")
    r.add_argument("--name", action="append", help="display name per --model (default: the folder name)")
    r.add_argument("--adapter", action="append",
                   help="a PEFT LoRA adapter folder per --model, loaded on it and merged ('none' for a model "
                        "without one), e.g. --model BASE --adapter none --model BASE --adapter TUNED")
    r.add_argument("--tasks", default="phenotype,diagnosis,treatment_plan",
                   help="comma-separated tasks (default: the three CancerLLM tasks); also radonc_regimen, "
                        "radonc_modality, radonc_icd10")
    r.add_argument("--data", default="synthetic",
                   help="synthetic[:PATIENTS[:SEED]] (default), a folder with <task>/test.jsonl, or one JSONL file")
    r.add_argument("--out", required=True,
                   help="output folder (an existing run there is resumed if its model weights and settings match)")
    r.add_argument("--limit", type=int, help="only the first N test instances of each task")
    r.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    r.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="metric choices (default: standard)")
    r.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens (default 0: off; transformers' sampling default is 50)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0, help="sampling seed; also seeds the k-shot exemplar draw")
    r.add_argument("--shots", type=int, default=0, choices=(0, 1, 3, 5),
                   help="k-shot prompting with k exemplars from the training split (default 0: zero-shot)")
    r.add_argument("--max-new-tokens", help="override the paper's limits: N for every task, task=N for one "
                                            "(task=N wins over N: 64,diagnosis=8)")
    r.add_argument("--max-input-tokens", help="override the prompt budgets: N or task=N,... (as --max-new-tokens)")
    r.add_argument("--dtype", default="float32", help="weight/compute dtype (float32, bfloat16)")
    r.add_argument("--mesh", help="DATAxMODEL device mesh (default 1x1)")
    r.add_argument("--tokenizer", help="tokenizer spec when the model folder has none")
    r.add_argument("--overwrite", action="store_true",
                   help="discard predictions in --out made by other model weights or with other settings (task, "
                        "token limits, sampling, shots, dtype, tokenizer) and decode them again; default: refuse")


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(mesh_value_joined(argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
