#!/usr/bin/env python
"""LoRA continued pretraining (CancerLLM stage 1) on a device mesh.

    python launch/pretrain.py --mesh 10x1                       # tiny model, built-in synthetic notes, CPU ok
    python launch/pretrain.py --config configs/pretrain/cancerllm_7b.yaml model=/path/to/Mistral-7B-v0.1
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package first

from cancerllm_jax.errors import cli_main
from cancerllm_jax.launch_common import (add_train_flags, announce, announce_privacy, cli_values, default_workdir,
                                         start_runtime)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    p.add_argument("--data", nargs="+", help="pretraining files/globs (.jsonl with 'text', or .txt); "
                                             "default: the built-in synthetic clinical corpus")
    p.add_argument("--epochs", type=float, help="passes over the corpus' train blocks; sets the steps (read first: "
                                                "the corpus is tokenized before the trainer is built)")
    return p.parse_intermixed_args(argv)  # key=value overrides may come between flags


@cli_main
def main(argv=None):
    args = parse(argv)
    from cancerllm_jax.train.config import PretrainConfig, resolve

    overrides = list(args.overrides)
    # `--data a.jsonl lora.rank=4`: a key=value that is not a file is an override, not a data source
    # (`data.weights=[3,1]` too: a dotted name before the '=' is a key, whatever follows)
    data = [d for d in args.data or [] if os.path.exists(d) or not re.match(r"[A-Za-z_][\w.]*=", d)]
    overrides += [d for d in args.data or [] if d not in data]
    if data:  # as a YAML flow list: a path with a comma stays one path
        overrides.append("data.sources=" + json.dumps(data))
    if args.skip_bad_lines:
        overrides.append("data.skip_bad_lines=true")
    if args.no_segment_mask:
        overrides.append("data.segment_mask=false")
    cfg = resolve(PretrainConfig, args.config, overrides, {**cli_values(args), "epochs": args.epochs})
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
    workdir = args.workdir or default_workdir("pretrain")
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
