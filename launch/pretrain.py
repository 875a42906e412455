#!/usr/bin/env python
"""LoRA continued pretraining (CancerLLM stage 1) on a device mesh.

    python launch/pretrain.py --mesh 10x1                       # tiny model, built-in synthetic notes, CPU ok
    python launch/pretrain.py --config configs/pretrain/cancerllm_7b.yaml model=/path/to/Mistral-7B-v0.1
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import cli_main
from cancerllm_jax.launch_common import (add_train_flags, announce, announce_privacy, cli_values, given_at,
                                         mesh_value_joined, refuse_steps_with_epochs, run_folder, start_runtime)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    p.add_argument("--data", nargs="+", help="pretraining files/globs (.jsonl with 'text', or .txt); "
                                             "default: the built-in synthetic clinical corpus")
    p.add_argument("--no-segment-mask", action="store_true",
                   help="let packed documents attend to each other, as HF group_texts in the authors' script does")
    p.add_argument("--epochs", type=float, help="passes over the corpus' train blocks; sets the steps (read first: "
                                                "the corpus is tokenized before the trainer is built)")
    return p.parse_intermixed_args(mesh_value_joined(argv))  # key=value overrides may come between flags


def _steps_or_epochs(cfg, args, overrides: list[str]):
    """``steps`` given on the command line over ``epochs`` from --config: ``epochs`` is dropped from the run's
    config, and a note says so. In one --config file ``epochs`` wins (``steps`` is what --dry-run plans with);
    both on the command line is an error."""
    if cfg.epochs is None:
        return cfg
    refuse_steps_with_epochs(cfg, args, overrides)
    if given_at("steps", args.steps, overrides, args.config) <= given_at("epochs", args.epochs, overrides, args.config):
        return cfg
    import dataclasses

    announce(f"note: steps={cfg.steps} on the command line sets the run's length; the config's epochs="
             f"{cfg.epochs:g} is ignored")
    return dataclasses.replace(cfg, epochs=None)


@cli_main
def main(argv=None):
    args = parse(argv)
    workdir = run_folder(args, "pretrain")  # before any data is read: --resume without --workdir is refused
    from cancerllm_jax.config import literal_override
    from cancerllm_jax.train.config import PretrainConfig, resolve

    overrides = list(args.overrides)
    # `--data a.jsonl lora.rank=4`: a key=value that is not a file is an override, not a data source
    # (`data.weights=[3,1]` too: a dotted name before the '=' is a key, whatever follows)
    data = [d for d in args.data or [] if os.path.exists(d) or not re.match(r"[A-Za-z_][\w.]*=", d)]
    overrides += [d for d in args.data or [] if d not in data]
    flags = []  # (the flag as typed, the setting it makes): a key=value giving it another value is refused
    if data:  # as a YAML flow list: a path with a comma stays one path
        flags.append((" ".join(["--data", *data]), literal_override("data.sources", data)))
    if args.skip_bad_lines:
        flags.append(("--skip-bad-lines", "data.skip_bad_lines=true"))
    if args.no_segment_mask:
        flags.append(("--no-segment-mask", "data.segment_mask=false"))
    cfg = resolve(PretrainConfig, args.config, overrides, {**cli_values(args), "epochs": args.epochs}, flags)
    cfg = _steps_or_epochs(cfg, args, overrides)
    announce_privacy(cfg.log_examples)
    start_runtime(args, cfg.mesh)

    from cancerllm_jax.train.loop import Trainer
    from cancerllm_jax.train.pretrain import pretrain_data_factory, steps_from_epochs

    make_data, base = pretrain_data_factory(cfg, announce), None
    if cfg.epochs is not None and args.dry_run:
        announce(f"note: --dry-run reads no data, so the steps of {cfg.epochs:g} epochs are not known; the plan "
                 f"below shows steps={cfg.steps}")
    elif cfg.epochs is not None:
        cfg, make_data, base = steps_from_epochs(cfg, announce)
    trainer = Trainer(cfg, workdir, "pretrain", make_data, resume=args.resume, dry_run=args.dry_run, base=base)
    if args.dry_run:
        print(trainer.describe(cfg.data.block_size, shardings=True))
        return 0
    import jax

    main_process = jax.process_index() == 0
    if main_process:
        announce(f"workdir: {os.path.abspath(workdir)}")
    result = trainer.run()
    if main_process:
        announce(f"done: {result['steps']} steps; load it with cancerllm_jax.load({os.path.abspath(workdir)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
