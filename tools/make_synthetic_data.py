#!/usr/bin/env python3
"""Write the synthetic CancerLLM data set: pretraining corpus, six instruction tasks (train/val/test) and DATA.md.

    python tools/make_synthetic_data.py --out data/synthetic --seed 0 --size 2000
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cancerllm_jax.errors import UserError, cli_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--size", type=int, default=1000, help="number of synthetic patients (>= 10)")
    p.add_argument("--pretrain-docs", type=int, default=None, help="pretraining documents, >= 1 (default 5 x size)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size < 10:
        raise UserError(f"--size must be at least 10 (got {args.size})")
    if args.pretrain_docs is not None and args.pretrain_docs < 1:  # 0: an empty corpus pretrain.py refuses later
        raise UserError(f"--pretrain-docs must be at least 1 (got {args.pretrain_docs}); leave it out for 5 x --size")
    from cancerllm_jax.data.synthetic import write_dataset

    counts = write_dataset(args.out, args.size, seed=args.seed, n_pretrain_docs=args.pretrain_docs,
                           overwrite=args.overwrite)
    print(json.dumps(counts))
    print(f"wrote {args.out} (see {os.path.join(args.out, 'DATA.md')})")


if __name__ == "__main__":
    main()
