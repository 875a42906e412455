#!/usr/bin/env python3
"""Crash consistency: SIGKILL a small pretraining run at random moments, resume it each time, compare with a run
that was never interrupted.

    python tools/crash_test.py --kills 20 [--seed S] [--workdir W] [--mesh 1x1] [--steps 12]

1. ``W/reference``: the tiny run (block 32, ``--steps`` steps, a checkpoint every 2 steps, eval every 3) uninterrupted.
2. ``W/killed``: the same run, killed with SIGKILL ``--kills`` times and started again with ``--resume`` after each
   kill, with no cleanup in between. Each kill (seeded) lands in one of these moments:
   ``startup`` (imports, compile, writing run.json / base/), ``step`` (just after a step's metrics row),
   ``checkpoint`` (just after an Orbax ``<step>.orbax-checkpoint-tmp-*`` folder appears: an async write in progress),
   ``eval`` (just after the step row of an eval step: the eval loss is being computed).
3. Checks: after every kill, only finished checkpoints have step-number names and the next start says
   ``resumed from step <the newest finished one>``; at the end, the loss and eval-loss history in ``metrics.jsonl``
   and the final checkpoint's LoRA weights and optimiser state are bit-identical to the reference.

Prints one line per kill and a JSON summary; exit 0 when everything matched, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cancerllm_jax.errors import UserError, cli_main  # noqa: E402

LAUNCHER = os.path.join(ROOT, "launch", "pretrain.py")
MODES = ("step", "checkpoint", "eval", "startup")
TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
POLL_S = 0.002


def run_args(args, workdir: str) -> list[str]:
    return ["--mesh", args.mesh, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--save-every", str(args.save_every), "--workdir", workdir, "--seed", str(args.seed % 1000),
            "data.block_size=32", "synthetic_documents=40", "lora.rank=4", "data.eval_fraction=0.2",
            f"eval_every={args.eval_every}", "eval_batches=1", "keep=2"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher picks the device count
    env.update({"JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1"})
    return env


def metric_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written
    except OSError:
        pass
    return rows


def history(workdir: str) -> list[tuple]:
    """The run's loss history: (step, 'loss'|'eval_loss', value) in file order (timings left out)."""
    out = []
    for r in metric_rows(workdir):
        for k in ("loss", "eval_loss"):
            if k in r:
                out.append((r["step"], k, r[k]))
    return out


def last_loss_step(workdir: str) -> int:
    return max((r["step"] for r in metric_rows(workdir) if "loss" in r), default=0)


def ckpt_listing(workdir: str, names_out: set | None = None) -> tuple[list[int], list[int]]:
    """(finished step folders, steps of Orbax temp folders) under checkpoints/; temp names go to ``names_out``."""
    d = os.path.join(workdir, "checkpoints")
    try:
        names = os.listdir(d)
    except OSError:
        return [], []
    done = sorted(int(n) for n in names if n.isdigit())
    tmp = sorted(int(m.group(1)) for n in names for m in [TMP_RE.match(n)] if m)
    if names_out is not None:
        names_out.update(n for n in names if TMP_RE.match(n))
    return done, tmp


def metrics_inode(workdir: str):
    try:
        return os.stat(os.path.join(workdir, "metrics.jsonl")).st_ino
    except OSError:
        return None


def complete(workdir: str, step: int) -> bool:
    d = os.path.join(workdir, "checkpoints", str(step))
    return all(os.path.exists(os.path.join(d, p)) for p in ("state", "data", "_CHECKPOINT_METADATA",
                                                            os.path.join("state", "_METADATA")))


def final_state(workdir: str):
    import numpy as np

    import jax

    from cancerllm_jax.checkpoint.orbax_io import restore_tree
    from cancerllm_jax.train import run_io

    step = run_io.latest_step(os.path.join(workdir, "checkpoints"))
    state = restore_tree(os.path.join(workdir, "checkpoints", str(step), "state"))
    return step, jax.tree.map(np.asarray, {"params": state["params"], "opt_state": state["opt_state"],
                                           "step": state["step"], "rng": state["rng"]})


def trees_equal(a, b) -> bool:
    import numpy as np

    import jax

    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return (len(la) == len(lb) and all(pa == pb for (pa, _), (pb, _) in zip(la, lb))
            and all(x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb)))


class Child:
    def __init__(self, args, workdir: str, resume: bool, log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, LAUNCHER, *run_args(args, workdir), *(["--resume"] if resume else [])]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


def run_to_end(args, workdir: str, resume: bool, log_path: str) -> tuple[int, str, float]:
    c = Child(args, workdir, resume, log_path)
    try:
        rc = c.wait(args.timeout)
    except subprocess.TimeoutExpired:
        c.proc.kill()
        c.proc.wait()
        rc = -9
    return rc, c.output(), time.monotonic() - c.t0


def plan(rng: random.Random, args, startup_s: float) -> list[dict]:
    """Seeded kill plan: target steps spread over the run (non-decreasing), a mode and a delay for each."""
    targets = sorted(rng.randint(1, args.steps - 1) for _ in range(args.kills))
    out = []
    for t in targets:
        mode = rng.choice(MODES)
        if mode == "startup":
            delay = rng.uniform(0.3, startup_s)
        elif mode == "checkpoint":
            delay = rng.uniform(0.0, 0.02)
        elif mode == "eval":
            delay = rng.uniform(0.0, 0.03)
        else:
            delay = rng.uniform(0.0, 0.1)
        out.append({"target": t, "mode": mode, "delay": round(delay, 4)})
    return out


def wait_trigger(c: Child, workdir: str, k: dict, args, resumed_from: int, stale: tuple) -> str | None:
    """Block until the kill moment of plan entry ``k`` (then sleep its delay); None if the process ended first.

    ``stale``: (metrics.jsonl inode, Orbax temp folder names) left by the killed start; neither is a trigger.
    """
    mode, t = k["mode"], max(k["target"], resumed_from + 1)
    stale_inode, stale_tmp = stale
    save_at = next((s for s in range(t, args.steps + 1) if s % args.save_every == 0 or s == args.steps), args.steps)
    eval_at = next((s for s in range(t, args.steps + 1) if s % args.eval_every == 0 or s == args.steps), args.steps)
    deadline = time.monotonic() + args.timeout
    seen_tmp = False
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            return None
        if mode == "startup":  # at the planned delay, or when the start reaches its first step if sooner
            if time.monotonic() - c.t0 >= k["delay"]:
                return "startup"
            ino = metrics_inode(workdir)
            if ino is not None and ino != stale_inode:
                return "startup (reached training)"
        elif mode in ("step", "eval"):  # rows of the new start only (it rewrites metrics.jsonl first)
            ino = metrics_inode(workdir)
            if ino is not None and ino != stale_inode and last_loss_step(workdir) >= (t if mode == "step"
                                                                                      else eval_at):
                break
        elif mode == "checkpoint":
            names: set = set()
            done, _ = ckpt_listing(workdir, names)
            fresh = [int(TMP_RE.match(n).group(1)) for n in names - stale_tmp]
            if any(s >= save_at for s in fresh):
                seen_tmp = True
                break
            if any(s >= save_at for s in done):  # finished between two polls: kill just after the write
                break
        time.sleep(POLL_S)
    else:
        return None
    if mode != "startup":
        time.sleep(k["delay"])
    return f"{mode}@{save_at if mode == 'checkpoint' else eval_at if mode == 'eval' else t}" + (
        " (tmp folder seen)" if seen_tmp else "")


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="folder for both runs and their logs (default: a new temp folder, removed "
                                     "on success)")
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed for one launcher start")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    for flag, value, least in (("--kills", args.kills, 1), ("--steps", args.steps, 3), ("--batch-size",
                               args.batch_size, 1), ("--save-every", args.save_every, 1),
                               ("--eval-every", args.eval_every, 1)):
        if value < least:
            raise UserError(f"{flag} must be >= {least} (got {value})")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds (got {args.timeout})")
    own_tmp = args.workdir is None
    # absolute: the runs start in the checkout, the checks read from here
    base = os.path.abspath(os.path.expanduser(args.workdir)) if args.workdir else tempfile.mkdtemp(
        prefix="cancerllm-crash-")
    os.makedirs(base, exist_ok=True)
    # a compile cache shared by all the launcher starts (warm starts take seconds, not half a minute)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(base, "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    ref, run = os.path.join(base, "reference"), os.path.join(base, "killed")
    for d in (ref, run):
        shutil.rmtree(d, ignore_errors=True)
    t_start = time.monotonic()

    rc, out, dt = run_to_end(args, ref, False, os.path.join(base, "reference.log"))
    if rc != 0:
        raise UserError(f"the reference run failed (exit {rc}); see {base}/reference.log:\n{out[-2000:]}")
    print(f"reference run: {args.steps} steps in {dt:.1f} s", flush=True)
    rng = random.Random(args.seed)
    kills = plan(rng, args, startup_s=8.0)
    failures: list[str] = []
    landed, expect_resume = [], None
    for i, k in enumerate(kills):
        c = Child(args, run, resume=i > 0, log_path=os.path.join(base, f"start{i:02d}.log"))
        stale_tmp: set = set()
        ckpt_listing(run, stale_tmp)  # primes stale_tmp with the temp folders that already exist
        where = wait_trigger(c, run, k, args, expect_resume or 0, (metrics_inode(run), stale_tmp))
        if where is None:  # ended (or hung) before the moment came
            if c.proc.poll() is None:
                c.proc.kill()
            rc = c.wait(30)
            failures.append(f"kill {i + 1}: the start ended with exit {rc} before its kill moment ({k})")
            print(c.output()[-2000:], file=sys.stderr)
            break
        c.proc.send_signal(signal.SIGKILL)
        c.wait(30)
        text = c.output()
        if expect_resume is not None and "Traceback" in text:
            failures.append(f"start {i}: traceback in its output (see start{i:02d}.log)")
        if expect_resume and f"resumed from step {expect_resume}" not in text and "resumed from step" in text:
            got = re.search(r"resumed from step (\d+)", text).group(1)
            failures.append(f"start {i}: resumed from step {got}, expected the newest finished {expect_resume}")
        done, tmp = ckpt_listing(run)
        # The newest step-named folder is what --resume takes: it must be complete. An OLDER one may be half
        # deleted (a kill while Orbax removed it for `keep`); it is never taken and goes at the next save.
        if done and not complete(run, max(done)):
            failures.append(f"kill {i + 1}: the newest step folder {max(done)} looks finished but is incomplete")
        partly_deleted = [s for s in done[:-1] if not complete(run, s)]
        expect_resume = max(done) if done else 0
        landed.append({"kill": i + 1, "moment": where, "t_s": round(time.monotonic() - c.t0, 2),
                       "last_step_row": last_loss_step(run), "checkpoints": done, "half_written": tmp,
                       "partly_deleted": partly_deleted})
        print(f"kill {i + 1:2d}/{args.kills}: {where:32s} at {landed[-1]['t_s']:6.2f} s; finished checkpoints "
              f"{done}; half-written {tmp or '-'}" + (f"; old step {partly_deleted} partly deleted" if partly_deleted
                                                      else ""), flush=True)

    if not failures:
        rc, out, dt = run_to_end(args, run, True, os.path.join(base, "final.log"))
        if rc != 0:
            failures.append(f"the final --resume failed (exit {rc}):\n{out[-2000:]}")
        elif expect_resume and f"resumed from step {expect_resume}" not in out:
            failures.append(f"the final start did not resume from step {expect_resume}")
    if not failures:
        h_ref, h_run = history(ref), history(run)
        if h_ref != h_run:
            first = next((i for i, (a, b) in enumerate(zip(h_ref, h_run)) if a != b), min(len(h_ref), len(h_run)))
            failures.append(f"loss history differs at entry {first}: reference {h_ref[first:first + 2]}, "
                            f"killed {h_run[first:first + 2]} ({len(h_ref)} vs {len(h_run)} entries)")
        s_ref, t_ref = final_state(ref)
        s_run, t_run = final_state(run)
        if s_ref != s_run or not trees_equal(t_ref, t_run):
            failures.append(f"final checkpoint differs (steps {s_ref} vs {s_run}; LoRA weights / optimiser state "
                            f"not bit-identical)")
    wall = time.monotonic() - t_start
    summary = {"ok": not failures, "kills": len(landed), "requested": args.kills, "seed": args.seed,
               "moments": {m: sum(1 for x in landed if x["moment"].startswith(m)) for m in MODES},
               "half_written_seen": sum(1 for x in landed if x["half_written"]),
               "partly_deleted_seen": sum(1 for x in landed if x["partly_deleted"]),
               "history_entries": len(history(ref)), "wall_s": round(wall, 1), "workdir": base,
               "failures": failures}
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"FAILED: {failures[0]}", file=sys.stderr)
        return 1
    print(f"OK: {len(landed)} SIGKILLs, resumed each time; loss history and final weights bit-identical "
          f"({wall:.0f} s)")
    if own_tmp:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
