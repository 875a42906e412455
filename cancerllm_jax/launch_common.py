"""Flags and start-up shared by the training launchers: config resolution, host devices, multi-host init."""
from __future__ import annotations

import argparse
import os
import sys
import time

from cancerllm_jax.errors import UserError


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 10x1 or 2x5 (default from the config: 1x1)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (rows per optimiser step, all devices)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workdir", help="run folder (default: runs/<kind>-<date>-<time>)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (async); 0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--full", action="store_true", default=None, help="train every weight instead of LoRA")
    p.add_argument("--dry-run", action="store_true", help="print shapes, shardings and the memory estimate; exit")
    p.add_argument("--log-examples", action="store_true", default=None,
                   help="allow note text in logs (off by default: notes are PHI)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed input lines")
    p.add_argument("--no-segment-mask", action="store_true",
                   help="let packed documents attend to each other, as HF group_texts in the authors' script does")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-host runs")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config field, e.g. lora.rank=16")


DECODE_FLAG_RULES = {  # argparse dest -> (test, what a valid value is)
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "max_prompt_tokens": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "decode_batch": (lambda v: v >= 1, "at least 1"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: no top-k)"),
    "temperature": (lambda v: 0 <= v < float("inf"), ">= 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_decode_flags(args) -> None:
    """Refuse decoding flags no decoder can use (``--top-k -1``, ``--top-p 0``, ...) before any model is loaded."""
    for name, (ok, what) in DECODE_FLAG_RULES.items():
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and not ok(value):
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def cli_values(args) -> dict:
    return {"mesh": args.mesh, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "save_every": args.save_every, "full": args.full, "log_examples": args.log_examples}


def start_runtime(args, mesh_text: str) -> None:
    """Before JAX starts: multi-host initialisation and, on CPU hosts, enough host devices for the mesh."""
    from cancerllm_jax.sharding import ensure_host_devices, parse_mesh

    d, m = parse_mesh(mesh_text)
    nproc = args.num_processes if args.num_processes is not None else _env_int("CANCERLLM_NUM_PROCESSES", 1, "")
    if nproc < 1:
        raise UserError(f"--num-processes must be at least 1, got {nproc}")
    if args.process_id is not None and not 0 <= args.process_id < nproc:
        raise UserError(f"--process-id must be in 0 … {nproc - 1} (--num-processes {nproc}), got {args.process_id}")
    if args.coordinator or nproc > 1:
        if not args.coordinator or args.process_id is None or nproc < 2:
            raise UserError("multi-host runs need --coordinator HOST:PORT, --num-processes N (>= 2) and "
                            "--process-id I")
        if (d * m) % nproc:
            raise UserError(f"mesh {d}x{m} ({d * m} devices) does not split over {nproc} processes")
        ensure_host_devices((d * m) // nproc, quiet=args.process_id != 0)
        import jax

        heartbeat = max(1, _env_int("CANCERLLM_HEARTBEAT_TIMEOUT", 60))
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=nproc,
                                   process_id=args.process_id, initialization_timeout=120,
                                   heartbeat_timeout_seconds=heartbeat,
                                   shutdown_timeout_seconds=max(1, _env_int("CANCERLLM_SHUTDOWN_TIMEOUT", 60)))
    else:
        ensure_host_devices(d * m)


def _env_int(name: str, default: int, unit: str = " of seconds") -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"{name}={value!r}: expected a whole number{unit}") from None


def default_workdir(kind: str) -> str:
    return os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def announce(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def announce_privacy(log_examples: bool) -> None:
    """Say at start when note text may be logged (``--log-examples``); by default it never is."""
    if log_examples:
        announce("--log-examples is ON: note text (possibly PHI) may appear in this run's console output and logs; "
                 "leave the flag out to keep note text out of everything but your prediction files")
