#!/usr/bin/env python
"""The whole CancerLLM protocol in one command, vanilla vs tuned side by side, written up as one report.

    python launch/reproduce.py --scale cpu-small [--out DIR] [--data DIR]
    python launch/reproduce.py --scale 7b --model /models/Mistral-7B-v0.1 [--pretrain-data 'notes/*.jsonl'] \\
        [--data DIR] [--out DIR]

Stages (each a launcher of its own, logged to OUT/logs/<stage>.log; a stage whose output exists is skipped and an
interrupted training run is resumed, so an interrupted run continues where it stopped; an OUT made with another
--scale, --model, --data, --pretrain-data or --skip pretrain is refused). Each stage records what it was made from
(its arguments, the weights fingerprint and tokenizer content hash of the models it reads, a fingerprint of its
data files): a finished stage whose inputs changed since (say a fine-tuning run deleted and trained again) is
redone, keeping what still matches (``--overwrite`` for evaluate and robustness), and a training stage whose run
folder was made from other inputs is refused until that folder is deleted:

1. data          synthetic data (``write_dataset``) unless ``--data DIR`` holds ``<task>/{train,val,test}.jsonl``
2. pretrain      LoRA continued pretraining on notes (``launch/pretrain.py``)
3. finetune      LoRA instruction tuning of the pretrained model on the three tasks' training splits together
                 (``launch/finetune.py``)
4. evaluate      vanilla vs tuned on phenotype / diagnosis / treatment plan (``launch/evaluate.py run``): Tables 2-4
                 and the efficiency table (Table 7)
5. robustness    misspelled test sets (Table 6) for the tuned model, and counterfactual phenotype labels (Table 5):
                 one fine-tuning per rate of the model instruction tuning starts from (``launch/robustness.py``)
6. report        OUT/report.md: stage times, the evaluation report, and the robustness tables

``cpu-small``: SmolLM2-135M-Instruct (imported from its GGUF with ``tools/import_gguf.py``), short sequences, a few
dozen optimiser steps, a few test instances per task and shortened generation budgets (the vanilla model does not
stop by itself; diagnosis/treatment-plan answers are < 100 tokens), sized to finish on a 2-core CPU within an hour.
``7b``: the paper's settings (configs/pretrain/cancerllm_7b.yaml, the fine-tuning defaults with the paper's
4000-token sequences and gradient checkpointing, paper decoding limits, whole test sets, bf16) for a GPU host.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import UserError, cli_main
from cancerllm_jax.launch_common import run_child

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_TASKS = ("phenotype", "diagnosis", "treatment_plan")


@dataclass
class Scale:
    patients: int
    pretrain: list[str]  # extra args for launch/pretrain.py
    finetune: list[str]  # extra args for launch/finetune.py
    train_limits: dict[str, int] | None  # training rows per task in the joint training set (None: all)
    evaluate: list[str]  # extra args for launch/evaluate.py run
    misspell: list[str]
    counterfactual: list[str] | None
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)


SCALES = {
    "cpu-small": Scale(
        patients=60,
        pretrain=["--mesh", "1x1", "--steps", "12", "--batch-size", "2", "--save-every", "0", "data.block_size=256",
                  "lora.rank=8", "optim.lr=5e-4", "eval_batches=1", "synthetic_documents=60"],
        finetune=["--epochs", "1", "--batch-size", "4", "--save-every", "0", "lora.rank=16", "lora.alpha=32",
                  "lora.dropout=0.0", "optim.lr=2e-3", "optim.warmup_ratio=0.1", "data.max_seq_len=512",
                  "data.pack=true", "eval_batches=1"],
        train_limits={"phenotype": 40, "diagnosis": 12, "treatment_plan": 12},
        evaluate=["--limit", "12", "--batch-size", "6", "--max-new-tokens",
                  "phenotype=24,diagnosis=40,treatment_plan=96"],
        misspell=["--rates", "0.08,0.4,0.8", "--limit", "4", "--max-new-tokens", "96", "--decode-batch", "4"],
        # one fine-tuning per rate on the 40 phenotype training examples (packed: a few steps each), as above
        counterfactual=["--rates", "0.2,0.4,0.6,0.8", "--epochs", "1", "--train-limit", "40", "--limit", "12",
                        "--max-new-tokens", "24", "--decode-batch", "6", "batch_size=4", "save_every=0",
                        "lora.rank=16", "lora.alpha=32", "lora.dropout=0.0", "optim.lr=2e-3",
                        "optim.warmup_ratio=0.1", "data.max_seq_len=512", "data.pack=true", "eval_batches=1"],
        notes=["cpu-small: 12 pretraining steps of 2 x 256 tokens and one fine-tuning epoch over at most 40 "
               "phenotype, 12 diagnosis and 12 treatment-plan examples (sequences of at most 512 tokens) on a 2-core "
               "CPU; shortened generation budgets (phenotype 24, diagnosis 40, treatment plan 96 new tokens instead "
               "of 50 / 500 / 500) and at most 12 test instances per task (the synthetic test split of 60 patients "
               "has 6 diagnosis and 6 treatment-plan notes); the counterfactual sweep fine-tunes the same way once per "
               "rate on the first 40 phenotype training examples. The numbers show the pipeline working end to end, "
               "not the paper's results."],
    ),
    "7b": Scale(
        patients=2000,
        pretrain=["--config", os.path.join(os.path.dirname(HERE), "configs", "pretrain", "cancerllm_7b.yaml")],
        # the paper's stage 2: max sequence 4000 (the fine-tuning default is 512, a CPU size), gradient checkpointing
        finetune=["--epochs", "5", "dtype=bfloat16", "data.max_seq_len=4000", "remat=full"],
        train_limits=None,
        evaluate=["--batch-size", "32", "--dtype", "bfloat16"],
        misspell=["--decode-batch", "32"],
        counterfactual=["--rates", "0.2,0.4,0.6,0.8", "--epochs", "5", "dtype=bfloat16", "data.max_seq_len=4000",
                        "remat=full"],
        dtype="bfloat16",
    ),
}


def _log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pipeline:
    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        self.state_path = os.path.join(self.out, "reproduce.json")
        self.state = {"stages": {}}
        if os.path.exists(self.state_path):
            from cancerllm_jax.eval.runner import read_json_file

            self.state = read_json_file(self.state_path, "pipeline record", "delete it or use another --out")
            if not isinstance(self.state, dict) or not isinstance(self.state.get("stages"), dict):
                raise UserError(f"{self.state_path}: not a record reproduce.py wrote (no 'stages' object); "
                                "delete it or use another --out")

    def check_settings(self, settings: dict) -> None:
        """Refuse to continue a folder whose finished stages were made with other ``settings`` (those recorded)."""
        from cancerllm_jax.eval.runner import differences

        old = self.state.get("settings") or {}
        changed = differences(old, {k: settings.get(k) for k in old})
        if changed:
            raise UserError(f"{self.out} was made with other settings: {'; '.join(changed)}. Its finished stages "
                            "would be mixed with this run's: use another --out")
        self.settings = settings

    def record_settings(self, *keys: str) -> None:
        """Record the settings ``keys`` once a stage that depends on them is finished."""
        self.state.setdefault("settings", {}).update({k: self.settings[k] for k in keys})
        self.save()

    def save(self) -> None:
        from cancerllm_jax.train.run_io import write_json_atomic

        write_json_atomic(self.state_path, self.state)

    def stage(self, name: str, output: str, inputs: dict, cmd: list[str] | None = None, fn=None,
              folder: str | None = None) -> None:
        """Run one stage (a subprocess ``cmd`` or a function) unless it finished with these ``inputs`` (what it was
        made from: settings, fingerprints of the models and files it reads) and its ``output`` exists; record its
        wall time. A stage begun with other inputs is redone, its outputs replaced, except while its training run
        ``folder`` exists: that is refused (its training would otherwise resume on other inputs, or be lost)."""
        from cancerllm_jax.eval.runner import differences

        entry = self.state["stages"].get(name, {})
        old = entry.get("inputs")
        if old is None and "wall_s" in entry:  # finished by a version that kept no inputs: taken as made from these
            old = entry["inputs"] = inputs
            entry["finished"] = True
        if old is not None and old != inputs:
            changed = "; ".join(differences(old, inputs)) or "other inputs"
            if folder is not None and os.path.exists(folder):
                raise UserError(f"{name}: {folder} was made from other inputs than this run's: {changed}. Delete "
                                f"{folder} to run this stage again (later stages are then redone), or use another "
                                "--out")
            _log(f"{name}: made from other inputs ({changed[:300]}): redone")
        elif entry.get("finished") and os.path.exists(output):
            _log(f"{name}: already done, skipped")
            entry["skipped_last_run"] = True
            self.save()
            return
        self.state["stages"][name] = {"inputs": inputs, "finished": False}  # a stage cut short is not done
        self.save()
        _log(f"{name}: " + (" ".join(shlex.quote(c) for c in cmd) if cmd else "running"))
        t0 = time.time()
        if cmd:
            logf = os.path.join(self.out, "logs", f"{name}.log")
            with open(logf, "a") as f:  # a re-run appends: an earlier attempt's output stays readable
                f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(shlex.quote, cmd))}\n")
                f.flush()
                start = f.tell()
                returncode = run_child(cmd, f, f"stage {name} (log: {logf})", cwd=os.path.dirname(HERE))
            if returncode != 0:  # one line: this attempt's own error (its whole output is in the log)
                with open(logf, errors="replace") as f:
                    f.seek(start)
                    lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
                why = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")),
                           lines[-1] if lines else "no output")
                raise UserError(f"stage {name} failed (exit {returncode}): {why[:1000]} (log: {logf})")
        else:
            fn()
        dt = time.time() - t0
        self.state["stages"][name] = {"wall_s": round(dt, 1), "command": cmd and " ".join(map(shlex.quote, cmd)),
                                      "inputs": inputs, "finished": True}
        self.save()
        _log(f"{name}: {dt:.0f} s")


def check_model(model: str) -> None:
    """What the stages would refuse about the base ``model``, found before OUT is made: its config, a training run
    without a finished checkpoint, and an HF folder's tensors (``check_hf_tensors``: no weight is read)."""
    from cancerllm_jax.api import check_readable, model_kind, read_model_config
    from cancerllm_jax.checkpoint.hf import check_hf_tensors

    path, kind = model_kind(model)
    read_model_config(path)
    check_readable(path)
    if kind == "hf":
        check_hf_tensors(path)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(path + ".tmp", path)


def _read_split(data: str, task: str, split: str) -> list[dict]:
    from cancerllm_jax.eval.tasks import read_jsonl_records

    return read_jsonl_records(os.path.join(data, task, f"{split}.jsonl"), task)


def joint_training_set(data: str, out: str, limits: dict[str, int] | None) -> None:
    """The three tasks' train (and val) splits in one file each, shuffled with a fixed seed."""
    import random

    for split in ("train", "val"):
        rows = []
        for task in EVAL_TASKS:
            recs = _read_split(data, task, split)
            if limits and task in limits:
                recs = recs[:limits[task] if split == "train" else max(2, limits[task] // 8)]
            rows += [{"id": f"{task}:{r['id']}", "instruction": r["instruction"], "context": r["context"],
                      "response": r["response"]} for r in recs]
        random.Random(0).shuffle(rows)
        _write_jsonl(os.path.join(out, f"{split}.jsonl"), rows)


def _inputs(cmd: list[str] | None = None, models: tuple[str, ...] = (), files: list[str] = (), **settings) -> dict:
    """What a stage is made from: its command's arguments, each model's weights fingerprint and tokenizer content
    hash, and a fingerprint (sizes, modification times) of the data files it reads."""
    from cancerllm_jax.eval.runner import _files_digest, model_fingerprint, tokenizer_sha256, tokenizer_spec

    root = os.path.dirname(HERE) + os.sep
    out = dict(settings)
    if cmd:
        out["arguments"] = [a.replace(root, "") for a in cmd[2:]]  # not the interpreter's or the checkout's place
    for i, m in enumerate(models):
        out[f"model{i}"] = {**model_fingerprint(m), "tokenizer_sha256": tokenizer_sha256(tokenizer_spec(m, None))}
    if files:  # patterns (--pretrain-data 'notes/*.jsonl') stand for the files they match
        out["files"] = _files_digest(os.sep, sorted({os.path.abspath(f) for pat in files
                                                     for f in glob.glob(pat) or [pat]}))
    return out


def _split_files(data: str, splits: tuple[str, ...]) -> list[str]:
    return [os.path.join(data, task, f"{split}.jsonl") for task in EVAL_TASKS for split in splits]


def _data_note(out: str, state: dict) -> str:
    """What this run actually trained on: the joint training set's examples per task, and whether it pretrained."""
    counts = {task: 0 for task in EVAL_TASKS}
    path = os.path.join(out, "joint", "train.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                task = json.loads(line)["id"].split(":", 1)[0] if line.strip() else None
                if task in counts:
                    counts[task] += 1
    per_task = ", ".join(f"{n} {task.replace('_', ' ')}" for task, n in counts.items())
    pretrained = "continued pretraining, then " if (state.get("stages", {}).get("pretrain") or {}).get("finished") \
        and state.get("settings", {}).get("pretrain", True) else "no continued pretraining (skipped); "
    return f"This run: {pretrained}instruction tuning on {sum(counts.values())} examples ({per_task})."


def write_combined_report(out: str, state: dict, scale: str) -> str:
    """OUT/report.md: the pipeline's stages and times, then the evaluation report, then the robustness tables."""
    lines = [f"# CancerLLM reproduction ({scale})", "",
             "Continued pretraining → instruction tuning → the three tasks (vanilla vs tuned) → robustness → "
             "efficiency, produced by `launch/reproduce.py`.", "", "## Pipeline", "",
             "| Stage | Wall time | Command |", "|---|---:|---|"]
    from cancerllm_jax.eval.report import hms

    total = 0.0
    for name, st in state["stages"].items():
        total += st.get("wall_s", 0.0)
        cmd = (st.get("command") or "(in process)").replace(out, "OUT").replace(sys.executable, "python")
        cmd = cmd.replace(os.path.dirname(HERE) + os.sep, "").replace("|", "\\|")
        lines.append(f"| {name} | {hms(st.get('wall_s'))} | `{cmd[:160]}{'…' if len(cmd) > 160 else ''}` |")
    lines += [f"| **total** | **{hms(total)}** | |", ""]
    for note in [*state.get("notes", []), _data_note(out, state)]:
        lines += [f"> {note}", ""]
    ev = os.path.join(out, "eval", "report.md")
    if os.path.exists(ev):
        body = open(ev, encoding="utf-8").read().split("\n")
        body = [("#" + ln if ln.startswith("#") else ln) for ln in body[1:]]  # demote headings
        body = [ln.replace("](scores_", "](eval/scores_").replace("](efficiency.png", "](eval/efficiency.png")
                for ln in body]
        lines += ["## Evaluation: vanilla vs tuned", ""] + body
    for sweep, table in (("misspell", "table6.md"), ("counterfactual", "table5.md")):
        path = os.path.join(out, "robustness", sweep, table)
        if os.path.exists(path) and state["stages"].get(f"robustness_{sweep}", {}).get("finished"):
            lines += [f"## Robustness: {sweep} ({table[:-3].replace('table', 'Table ')}-shaped)", "",
                      open(path, encoding="utf-8").read().strip(), ""]
            png = os.path.join("robustness", sweep, "robustness.png")
            if os.path.exists(os.path.join(out, png)):
                lines += [f"![{sweep} sweep]({png})", ""]
        elif sweep == "counterfactual":
            lines += ["## Robustness: counterfactual (Table 5)", "",
                      "Not run at this scale (one fine-tuning per noise rate); run "
                      "`launch/robustness.py counterfactual` on its own.", ""]
    from cancerllm_jax.train.run_io import write_text_atomic

    path = os.path.join(out, "report.md")
    write_text_atomic(path, "\n".join(lines))
    return path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), required=True)
    p.add_argument("--out", help="output folder (default: runs/reproduce-<scale>); an existing one is continued")
    p.add_argument("--data", help="folder with <task>/{train,val,test}.jsonl (default: synthetic data)")
    p.add_argument("--model", help="base model (default cpu-small: SmolLM2-135M-Instruct from its GGUF; "
                                   "required for 7b)")
    p.add_argument("--pretrain-data", nargs="+", help="pretraining JSONL/txt files (default: the synthetic notes)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: pretrain,robustness")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse(argv)
    scale = SCALES[args.scale]
    out = os.path.abspath(args.out or os.path.join("runs", f"reproduce-{args.scale}"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"pretrain", "robustness"}
    if unknown:
        raise UserError(f"--skip: only pretrain and robustness can be skipped, got {sorted(unknown)}")
    # the base model, checked before OUT is made (absolute: the stages run from the checkout folder)
    model = os.path.abspath(os.path.expanduser(args.model)) if args.model else None
    if model is not None and not os.path.exists(model):
        raise UserError(f"--model {args.model}: not found (give an HF folder or a converted checkpoint)")
    if model is None and args.scale == "7b":
        raise UserError("--scale 7b needs --model (a Mistral-7B-v0.1 HF folder or converted checkpoint)")
    if model is not None:
        check_model(model)
    data = os.path.abspath(args.data) if args.data else os.path.join(out, "data")
    if args.data:
        for task in EVAL_TASKS:
            for split in ("train", "val", "test"):
                if not os.path.isfile(os.path.join(data, task, f"{split}.jsonl")):
                    raise UserError(f"--data {data}: {task}/{split}.jsonl is missing")
    # read from the caller's folder, as recorded: the pretraining subprocess runs in the checkout
    pretrain_data = [os.path.abspath(os.path.expanduser(p)) for p in args.pretrain_data or ()]
    pipe = Pipeline(out)
    pipe.check_settings({"scale": args.scale, "model": model, "data": args.data and os.path.abspath(args.data),
                         "pretrain_data": pretrain_data or args.pretrain_data,
                         "pretrain": "pretrain" not in skip})
    pipe.state.update({"scale": args.scale, "notes": scale.notes})
    py = sys.executable
    t_start = time.time()

    # 0. the base model
    if model is None:
        from cancerllm_jax.checkpoint.gguf import import_gguf

        t0 = time.time()
        model = import_gguf()
        pipe.state["stages"]["import_gguf"] = {"wall_s": round(time.time() - t0, 1),
                                               "command": "cancerllm_jax.checkpoint.gguf.import_gguf()"}
    pipe.state["base_model"] = model
    pipe.save()

    # 1. data
    if not args.data:
        def make_data():
            from cancerllm_jax.data.synthetic import write_dataset

            write_dataset(data, scale.patients, seed=0, overwrite=True)

        pipe.stage("data", os.path.join(data, "DATA.md"), _inputs(patients=scale.patients, seed=0), fn=make_data)
    joint = os.path.join(out, "joint")
    pipe.stage("joint_training_set", os.path.join(joint, "val.jsonl"),
               _inputs(files=_split_files(data, ("train", "val")), limits=scale.train_limits),
               fn=lambda: joint_training_set(data, joint, scale.train_limits))
    pipe.record_settings("scale", "data")

    # 2. continued pretraining
    from cancerllm_jax.api import _tokenizer_in
    from cancerllm_jax.config import literal_override

    # the model's own tokenizer where its folder has one (else the default, as cancerllm_jax.load falls back to)
    tok = [literal_override("data.tokenizer", model)] \
        if args.scale == "cpu-small" and os.path.isdir(model) and _tokenizer_in(model) else []
    pre_dir = os.path.join(out, "pretrain")
    if "pretrain" not in skip:
        corpus = os.path.join(data, "pretrain", "corpus.jsonl")
        sources = pretrain_data or ([corpus] if os.path.exists(corpus) else None)
        # --resume: a run an interrupt stopped continues (a new one starts at step 0; other settings are refused)
        cmd = [py, os.path.join(HERE, "pretrain.py"), *scale.pretrain, "--workdir", pre_dir, "--resume",
               literal_override("model", model), *tok]  # paths taken literally (` #`, `: `)
        if sources:
            cmd[2:2] = ["--data", *sources]
        pipe.stage("pretrain", os.path.join(pre_dir, "DONE"), _inputs(cmd, (model,), sources or ()), cmd,
                   folder=pre_dir)
        open(os.path.join(pre_dir, "DONE"), "w").close()
        pipe.record_settings("model", "pretrain_data", "pretrain")
        tuned_base = pre_dir
    else:
        tuned_base = model

    # 3. instruction tuning (all three tasks together)
    ft_dir = os.path.join(out, "finetune")
    cmd = [py, os.path.join(HERE, "finetune.py"), "--model", tuned_base, "--data", os.path.join(joint, "train.jsonl"),
           "--eval-data", os.path.join(joint, "val.jsonl"), "--workdir", ft_dir, "--resume", *scale.finetune, *tok]
    pipe.stage("finetune", os.path.join(ft_dir, "DONE"),
               _inputs(cmd, (tuned_base,), [os.path.join(joint, "train.jsonl"), os.path.join(joint, "val.jsonl")]),
               cmd, folder=ft_dir)
    open(os.path.join(ft_dir, "DONE"), "w").close()
    pipe.record_settings("model", "pretrain_data", "pretrain")

    # 4. the three tasks, vanilla vs tuned, with the efficiency table
    ev_dir = os.path.join(out, "eval")
    cmd = [py, os.path.join(HERE, "evaluate.py"), "run", "--model", model, "--name", "vanilla", "--model", ft_dir,
           "--name", "cancerllm-tuned", "--tasks", ",".join(EVAL_TASKS), "--data", data, "--out", ev_dir,
           *scale.evaluate, "--overwrite"]  # predictions no longer made by these models and settings: decoded again
    test_files = _split_files(data, ("test",))
    pipe.stage("evaluate", os.path.join(ev_dir, "report.md"), _inputs(cmd, (model, ft_dir), test_files), cmd)

    # 5. robustness
    rb_script = os.path.join(HERE, "robustness.py")
    if "robustness" not in skip and os.path.exists(rb_script):
        ms = os.path.join(out, "robustness", "misspell")
        cmd = [py, rb_script, "misspell", "--model", ft_dir, "--name", "cancerllm-tuned", "--data", data,
               "--tasks", "diagnosis,treatment_plan", "--out", ms, *scale.misspell, "--overwrite"]
        pipe.stage("robustness_misspell", os.path.join(ms, "table6.md"), _inputs(cmd, (ft_dir,), test_files), cmd)
        if scale.counterfactual is not None:
            cf = os.path.join(out, "robustness", "counterfactual")
            cmd = [py, rb_script, "counterfactual", "--model", tuned_base, "--name", "cancerllm", "--data", data,
                   "--out", cf, *scale.counterfactual, "--overwrite"]  # named as the model it makes, not its base
            pipe.stage("robustness_counterfactual", os.path.join(cf, "table5.md"),
                       _inputs(cmd, (tuned_base,), _split_files(data, ("train", "val", "test"))), cmd)
    elif "robustness" not in skip:
        _log("robustness: launch/robustness.py not found; TODO: run the Table 5/6 sweeps when it exists")
    if "robustness" in skip:  # tables an earlier run made may describe other models: not in this report
        for name in ("robustness_misspell", "robustness_counterfactual"):
            pipe.state["stages"].pop(name, None)

    # 6. one report
    pipe.state["total_wall_s_this_invocation"] = round(time.time() - t_start, 1)
    pipe.save()
    path = write_combined_report(out, pipe.state, args.scale)
    _log(f"done in {time.time() - t_start:.0f} s; report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
