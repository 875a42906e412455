#!/usr/bin/env python
"""Evaluate CancerLLM generations with the paper's protocol.

    python launch/evaluate.py score --gold test.jsonl --pred predictions.jsonl [--protocol standard|reference]
                                    [--json scores.json] [--per-instance rows.jsonl]
    python launch/evaluate.py score --pred runner_output.jsonl   # a file carrying both `gold` and `prediction`

``run`` (generate, then score) is reserved for the task runner and not implemented yet.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

if importlib.util.find_spec("cancerllm_jax") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cancerllm_jax.errors import cli_main
from cancerllm_jax.eval.protocol import PROTOCOLS, score_file

ROWS = (("EM", "em"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rougeL"))


def format_table(result: dict[str, Any], protocol: str) -> str:
    """A small text table of P / R / F1 per metric and the Average F1."""
    lines = [f"protocol: {protocol}   instances: {result['n']}", f"{'metric':<8}{'P':>9}{'R':>9}{'F1':>9}"]
    for label, key in ROWS:
        lines.append(f"{label:<8}" + "".join(f"{result[f'{key}_{x}']:9.2f}" for x in ("p", "r", "f1")))
    lines.append(f"{'Avg F1':<8}{'':>18}{result['avg_f1']:9.2f}")
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def cmd_score(args: argparse.Namespace) -> int:
    """Score a prediction file, print the table, optionally write the summary and per-instance rows."""
    result = score_file(args.gold, args.pred, protocol=args.protocol, gold_field=args.gold_field,
                        pred_field=args.pred_field, per_instance=args.per_instance is not None)
    rows = result.pop("rows", None)
    print(format_table(result, args.protocol))
    if args.json:
        summary = {"protocol": args.protocol, "gold": args.gold, "pred": args.pred, **result}
        _write(args.json, json.dumps(summary, indent=2) + "\n")
    if args.per_instance:
        _write(args.per_instance, "".join(json.dumps(row) + "\n" for row in rows or []))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Placeholder for generate-then-score."""
    print("evaluate.py run: not implemented yet (generate predictions with the task runner, then use `score`)",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``score`` now, ``run`` later."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", parents=[common], help="score a JSONL prediction file against gold answers")
    s.add_argument("--gold", help="gold JSONL (field --gold-field); omit when --pred carries a `gold` field")
    s.add_argument("--pred", required=True, help="prediction JSONL (field --pred-field)")
    s.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="metric choices (default: standard)")
    s.add_argument("--gold-field", default="response", help="gold text field in --gold (default: response)")
    s.add_argument("--pred-field", default="prediction", help="prediction field in --pred (default: prediction)")
    s.add_argument("--json", metavar="OUT", help="write the summary as JSON")
    s.add_argument("--per-instance", metavar="OUT.jsonl", help="write one JSON line of scores per instance")
    s.set_defaults(func=cmd_score)

    r = sub.add_parser("run", parents=[common], help="generate with a model, then score (not implemented yet)")
    r.set_defaults(func=cmd_run)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
