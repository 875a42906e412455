#!/usr/bin/env python
"""CancerLLM's robustness testbeds: Table 5 (counterfactual labels) and Table 6 (misspellings).

    python launch/robustness.py counterfactual --model BASE --data DIR|synthetic[:PATIENTS[:SEED]] --out OUT \\
        [--rates 0.2,0.4,0.6,0.8] [--epochs 1] [--limit N] [--train-limit N] [key=value overrides for finetune.py]
    python launch/robustness.py misspell --model PATH [--adapter PEFT_DIR] --data DIR|FILE|synthetic[:P[:S]] \\
        --tasks diagnosis,treatment_plan --out OUT [--rates 0.02,0.04,0.06,0.08,0.2,0.4,0.6,0.8] [--limit N]

``counterfactual`` fine-tunes one LoRA model per rate (launch/finetune.py) on phenotype training data whose labels
are corrupted at that rate and scores each on the clean test set; ``misspell`` scores one model on test sets whose
contexts are misspelled at each rate (a rate counts the words of two or more letters; codes and numbers are left
alone). The paper (section 2.5) sets the misspelling rates "when constructing the training dataset" and then feeds
"the input sentence along with the instruction" to the model; we read this as noisy inputs to a model fine-tuned on
clean data, the deployment case of misspelled notes, and do not retrain per rate. A rate is rounded per record
(2 % of a 20-word context misspells no word): Table 6's 'misspelled' column gives the share of words actually
misspelled, and the log warns when a rate leaves records untouched or repeats a lower rate's inputs. A phenotype
record's question stays as written when the record names its 'sentence' (as the synthetic data does).

Counterfactual wrong labels are drawn from the training data's own labels (and a small built-in list): of the
record's entity type or another when records name it in an optional 'entity_type' (or 'answer_type') field,
from all the data's labels otherwise (a warning says so).

Both write OUT/table5.md or OUT/table6.md (with each rate's generation time, tokens/s and peak memory below the
scores), OUT/robustness.json and OUT/robustness.png; each rate's predictions and scores stay under
OUT/counterfactual/rate_NN/ or OUT/misspell/<task>/rate_NN/. Add 0 to --rates for a clean reference row (left out
of the mean over rates). The rates are nested: the labels or words noised at 20 % are among those noised at 40 %,
noised alike (for one --seed). One --out holds one counterfactual and one misspell sweep (each table names its model;
the two may be different models); the paper's tables set two models side by side, so run each model's sweep with
its own --out and compare their tables. DIR holds <task>/<split>.jsonl (a test split may also be
DIR/<task>.jsonl; counterfactual's phenotype/val.jsonl is optional: without it the fine-tuning runs report no
held-out loss); misspell of one task also reads one JSONL FILE, its test records, as evaluate.py run does.

Re-running with the same --out reuses a finished rate only if it was computed with the same settings: the model
(resolved path and a fingerprint of its weight files), the rate and --seed, the records used (--data, --limit,
--train-limit, --patients), the decoding limits, --protocol and, for counterfactual, --epochs and the overrides.
If any differs the command stops, before any work, with the differences; --overwrite recomputes such rates instead
(replacing their results). A counterfactual rate whose fine-tuning was interrupted resumes it on a re-run; a finished
fine-tuning run is reused when only the decoding settings changed. A damaged scores.json is recomputed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import UserError, cli_main
from cancerllm_jax.launch_common import check_decode_flags


# finetune.py keys each counterfactual run gets from the sweep: an override would train something other than what
# its settings, cache key and table say
SWEEP_KEYS = {"model": "use --model", "epochs": "use --epochs", "steps": "use --epochs (the steps follow from it)",
              "data.path": "each rate trains on its own corrupted file (give the clean data with --data)",
              "data.eval_path": "the held-out loss uses the val split of --data", "task": "it is always phenotype"}


def _mapping_keys(value: str) -> list[str]:
    """The keys of a YAML mapping given as an override's value (``data={path: x}``), else none."""
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return []
    return [str(k).strip() for k in parsed] if isinstance(parsed, dict) else []


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates: expected comma-separated fractions, got {text!r}") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"--rates: each rate must be a fraction in [0, 1] (0.2 = 20%), got {text!r}")
    if len(set(rates)) < len(rates):  # one rate twice would be computed twice and counted twice in the mean
        raise argparse.ArgumentTypeError(f"--rates: a rate is given twice in {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default="synthetic",
                        help="a folder with <task>/<split>.jsonl, synthetic[:PATIENTS[:SEED]] (default: synthetic, "
                             "--patients and --seed) or, for misspell of one task, one JSONL file")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--limit", type=int, help="score only the first N test examples per task")
    common.add_argument("--patients", type=int, default=60, help="synthetic patients (with --data synthetic)")
    common.add_argument("--seed", type=int, default=0, help="noise seed (and synthetic data seed)")
    common.add_argument("--max-new-tokens", type=int, help="default: the paper's limit per task (50 / 500)")
    common.add_argument("--max-prompt-tokens", type=int, help="default: the paper's limit (1500 / 4000)")
    common.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together")
    common.add_argument("--protocol", choices=("standard", "reference"), default="standard")
    common.add_argument("--name", help="model name in the table (default: the last part of the --adapter path if "
                        "given, else of --model)")
    common.add_argument("--overwrite", action="store_true",
                        help="recompute rates in --out that were computed with other settings (default: refuse)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    p = argparse.ArgumentParser(prog="robustness.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks (also after the subcommand)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("counterfactual", parents=[common], help="Table 5: corrupted phenotype training labels")
    c.add_argument("--model", required=True, help="the base to fine-tune: preset, HF folder, converted checkpoint "
                                                  "or training run")
    c.add_argument("--rates", type=_rates, default=[0.2, 0.4, 0.6, 0.8],
                   help="comma-separated fractions of training labels to corrupt (0.2 = 20%%; default 0.2,0.4,0.6,0.8)")
    c.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs per rate")
    c.add_argument("--train-limit", type=int, help="use only the first N training examples")
    c.add_argument("overrides", nargs="*", help="key=value overrides passed to launch/finetune.py")
    m = sub.add_parser("misspell", parents=[common], help="Table 6: misspelled test contexts")
    m.add_argument("--model", required=True, help="the fine-tuned model: HF folder, converted checkpoint, "
                                                  "training run, or a preset's random weights (tiny: a smoke run)")
    m.add_argument("--rates", type=_rates, default=[0.02, 0.04, 0.06, 0.08, 0.2, 0.4, 0.6, 0.8],
                   help="comma-separated fractions of words to misspell (0.02 = 2%%; default "
                        "0.02,0.04,0.06,0.08,0.2,0.4,0.6,0.8)")
    m.add_argument("--tasks", default="diagnosis,treatment_plan", help="comma-separated tasks")
    m.add_argument("--adapter", help="a PEFT LoRA adapter folder for --model (merged; 'none' for the bare model); "
                   "part of each rate's settings")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_decode_flags(args)
    from pathlib import Path

    from cancerllm_jax.eval.robustness import rate_dir

    names = {}
    for rate in args.rates:  # two rates closer than a folder name tells apart would write one folder
        name = rate_dir(Path(), rate).name
        if name in names:
            raise UserError(f"--rates: {names[name]!r} and {rate!r} are too close to tell apart (both {name})")
        names[name] = rate
    for flag, value in (("--limit", args.limit), ("--train-limit", getattr(args, "train_limit", None)),
                        ("--epochs", getattr(args, "epochs", None)), ("--patients", args.patients)):
        if value is not None and not value > 0:  # 0 or a negative N would use all or drop examples silently
            raise UserError(f"{flag} must be positive, got {value:g}")

    from cancerllm_jax.eval import robustness as rb
    from cancerllm_jax.eval.tasks import CANCERLLM_TASKS

    settings = rb.DecodeSettings(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                 batch_size=args.decode_batch, protocol=args.protocol)
    from cancerllm_jax.api import adapter_or_none

    adapter = adapter_or_none(getattr(args, "adapter", None))  # 'none': the bare model, as evaluate.py reads it
    name = args.name or os.path.basename(os.path.normpath(adapter or args.model))

    def split(task: str, which: str, limit: int | None, required: bool = True) -> list[dict]:
        return rb.load_split(args.data, task, which, limit, args.patients, args.seed, required)

    if args.command == "counterfactual":
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise UserError(f"overrides must be key=value, got {bad}")
        for o in args.overrides:  # the sweep sets these itself, and records them as its flags say
            key = o.split("=", 1)[0].strip()
            named = [key] + [f"{key}.{k}" for k in _mapping_keys(o.split("=", 1)[1])]  # data={eval_path: ...}
            for setting in named:
                if setting in SWEEP_KEYS:
                    raise UserError(f"override {setting}=…: the sweep sets {setting} itself; {SWEEP_KEYS[setting]}")
        from cancerllm_jax.config import PRESETS
        from cancerllm_jax.train.config import resolve
        from cancerllm_jax.train.finetune import FinetuneConfig

        # what each rate's fine-tuning would refuse (a typo, --epochs inf), refused once before anything is made
        resolve(FinetuneConfig, None, args.overrides, {"model": args.model, "epochs": args.epochs})
        if args.model not in PRESETS and not os.path.exists(args.model):
            raise UserError(f"--model {args.model}: not found (give an HF folder, converted checkpoint or run)")
        result = rb.counterfactual_sweep(args.model, split("phenotype", "train", args.train_limit),
                                         split("phenotype", "val", None, required=False),
                                         split("phenotype", "test", args.limit),
                                         args.out, args.rates, args.epochs, args.overrides, args.seed, settings,
                                         overwrite=args.overwrite)
    else:
        from cancerllm_jax.config import PRESETS

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in CANCERLLM_TASKS]
        if not tasks or unknown:
            raise UserError(f"--tasks: choose from {', '.join(CANCERLLM_TASKS)}, got {args.tasks!r}")
        if len(tasks) > 1 and os.path.isfile(args.data):
            raise UserError(f"--data {args.data} is one file, but {len(tasks)} tasks were given ({', '.join(tasks)}): "
                            "one file is one task's test split; give --tasks one task, or a folder with "
                            "<task>/test.jsonl for each")
        if args.model not in PRESETS and not os.path.exists(args.model):
            raise UserError(f"--model {args.model}: not found (give an HF folder, converted checkpoint or run)")
        if adapter is not None:  # checked against the model's config before any rate is computed
            from cancerllm_jax.api import check_adapter

            adapter = check_adapter(adapter, args.model)
        result = rb.misspelling_sweep(args.model, {t: split(t, "test", args.limit) for t in tasks}, args.out,
                                      args.rates, args.seed, settings, overwrite=args.overwrite, adapter=adapter)
    paths = rb.write_outputs(args.out, result, name)
    with open(paths["table"], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
