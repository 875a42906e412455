#!/usr/bin/env python
"""LoRA instruction tuning (CancerLLM stage 2) on a device mesh.

    python launch/finetune.py --model PATH --task diagnosis                 # synthetic data of that task
    python launch/finetune.py --config configs/finetune/diagnosis.yaml model=PATH data.path=train.jsonl
PATH: an HF folder, a converted checkpoint, or a pretraining run (its LoRA is merged first).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import UserError, cli_main
from cancerllm_jax.launch_common import (add_train_flags, announce, announce_privacy, cli_values, given_at,
                                         mesh_value_joined, refuse_steps_with_epochs, run_folder, start_runtime)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    p.add_argument("--model", help="base model: preset, HF folder, converted checkpoint or pretraining run")
    p.add_argument("--task", help="synthetic task when no data.path is given (default diagnosis)")
    p.add_argument("--data", help="training JSONL ({instruction, context, response})")
    p.add_argument("--eval-data", help="held-out JSONL for the per-epoch eval loss")
    p.add_argument("--epochs", type=float)
    return p.parse_intermixed_args(mesh_value_joined(argv))  # key=value overrides may come between flags


@cli_main
def main(argv=None):
    args = parse(argv)
    workdir = run_folder(args, "finetune")  # before any data is read: --resume without --workdir is refused
    from cancerllm_jax.config import literal_override
    from cancerllm_jax.train.config import MAX_COUNT, resolve
    from cancerllm_jax.train.finetune import FinetuneConfig

    overrides = list(args.overrides)
    flags = []  # (the flag as typed, the setting it makes): a key=value giving it another value is refused
    for flag, value, key in (("--data", args.data, "data.path"), ("--eval-data", args.eval_data, "data.eval_path")):
        if value:
            flags.append((f"{flag} {value}", literal_override(key, value)))  # the path taken literally (` #`, `: `)
    if args.skip_bad_lines:
        flags.append(("--skip-bad-lines", "data.skip_bad_lines=true"))
    cli = {**cli_values(args), "model": args.model, "task": args.task, "epochs": args.epochs}
    cfg = resolve(FinetuneConfig, args.config, overrides, cli, flags)
    refuse_steps_with_epochs(cfg, args, overrides)
    if cfg.data.path and given_at("task", args.task, overrides, args.config):
        announce(f"note: task={cfg.task} picks built-in synthetic data only; the data given ({cfg.data.path}) is "
                 "trained on as it is")
    train, held_out = cfg.data.path, cfg.data.eval_path
    if train and held_out and os.path.exists(train) and os.path.exists(held_out) and os.path.samefile(train, held_out):
        if not args.resume:  # a run started so by an earlier version still resumes, with the warning
            raise UserError(f"--eval-data {held_out} is the --data file: its loss would be a training loss; hold "
                            "out other examples")
        logging.getLogger(__name__).warning("--eval-data %s is the --data file: its loss is a training loss", held_out)
    announce_privacy(cfg.log_examples)
    start_runtime(args, cfg.mesh)

    import dataclasses

    import jax

    from cancerllm_jax.data.instruct import build_instruct_data
    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.train.finetune import load_records
    from cancerllm_jax.train.loop import DataBundle, Trainer, base_for_data

    say = announce if jax.process_index() == 0 else (lambda _msg: None)  # one process speaks for the run
    train_records, eval_records = load_records(cfg)
    if train_records is not None:
        held_out = (f"{len(eval_records)} eval examples" if eval_records is not None
                    else f"eval examples from {cfg.data.eval_path}")
        say(f"data: no data.path given; using built-in synthetic '{cfg.task}' data "
            f"({len(train_records)} train examples, {held_out})")
    # Steps come from epochs, so the data is read (and counted) before the trainer is built; the base is read
    # once, here, when its tokenizer is needed for that.
    base, tok_spec = base_for_data(cfg, args.dry_run)
    tokenizer = load_tokenizer(tok_spec)
    data = build_instruct_data(cfg.data, tokenizer, train_records, eval_records)
    per_epoch = data.steps_per_epoch(cfg.batch_size)
    if cfg.epochs * per_epoch > MAX_COUNT:
        raise UserError(f"epochs {cfg.epochs:g} x {per_epoch} steps per epoch is more than 2**31 - 1 steps")
    by_epochs = data.steps_for_epochs(cfg.epochs, cfg.batch_size)
    steps = cfg.steps or by_epochs
    cfg = dataclasses.replace(cfg, steps=steps, eval_every=cfg.eval_every or per_epoch,
                              data=dataclasses.replace(cfg.data, tokenizer=tok_spec))
    epochs = f"{cfg.epochs:g} epochs" if steps == by_epochs else (
        f"set by --steps: {steps / max(per_epoch, 1):.2f} epochs")
    say(f"data: {data.num_rows} rows, {per_epoch} steps per epoch, {steps} steps "
             f"({epochs}); {data.stats.get('truncated_examples', 0)} contexts truncated, "
             f"{data.stats.get('skipped_too_long', 0)} too long skipped, {data.stats.get('skipped_lines', 0)} "
             "lines skipped")
    ev = data.stats.get("eval")
    if ev:
        say(f"eval data: {ev['examples']} examples; {ev['truncated_examples']} contexts truncated, "
                 f"{ev['skipped_too_long']} too long skipped (not scored), {ev['skipped_lines']} lines skipped")

    def make_data(_tokenizer, process_index, process_count):
        return DataBundle(data.train_iterator(cfg.batch_size, process_index, process_count),
                          data.eval_batches(cfg.batch_size, process_index, process_count), data.stats,
                          cfg.data.max_seq_len)

    trainer = Trainer(cfg, workdir, "finetune", make_data, resume=args.resume, dry_run=args.dry_run, base=base)
    del base
    if args.dry_run:
        print(trainer.describe(cfg.data.max_seq_len))
        return 0
    say(f"workdir: {os.path.abspath(workdir)}")
    result = trainer.run()
    say(f"done: {result['steps']} steps; load it with cancerllm_jax.load({os.path.abspath(workdir)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
