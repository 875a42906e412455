"""Flags and start-up shared by the training launchers: config resolution, host devices, multi-host init."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time

from cancerllm_jax.errors import ChildStopped, UserError


def mesh_value_joined(argv=None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``--mesh -1x2`` as ``--mesh=-1x2``: argparse takes a value that starts
    with '-' for an option ("expected one argument"), where the mesh check names what is wrong."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--mesh" and i + 1 < len(argv) and str(argv[i + 1]).startswith("-") and argv[i + 1] != "--":
            out.append(f"--mesh={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _steps_or_fraction(text: str) -> int | float:
    """``--save-every``: a whole number of steps, or a fraction of the run (HF's ``save_steps`` below 1)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps or a fraction of the run in (0, 1), "
                                         f"got {text!r}") from None


def given_at(name: str, flag_value, overrides: list[str], config_path: str | None) -> int:
    """Where a setting was given: 2 on the command line (flag or key=value), 1 in the --config file, 0 nowhere."""
    if flag_value is not None or any(o.partition("=")[0].strip() == name for o in overrides):
        return 2
    if config_path:
        from cancerllm_jax.config import load_yaml

        return int(name in load_yaml(config_path))
    return 0


def refuse_steps_with_epochs(cfg, args, overrides: list[str]) -> None:
    """``steps`` and ``epochs`` both on the command line is one error: which of the two sets the run's length
    would be a guess."""
    if given_at("steps", args.steps, overrides, None) == given_at("epochs", args.epochs, overrides, None) == 2:
        raise UserError(f"both steps ({cfg.steps}) and epochs ({cfg.epochs:g}) are given: pass one of the two")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 10x1 or 2x5 (default from the config: 1x1)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (rows per optimiser step, all devices)")
    p.add_argument("--seed", type=int, help="seeds the LoRA (or preset) initialisation and dropout; the data's "
                                            "shuffle, eval split and synthetic data use data.seed (default 0): "
                                            "pass data.seed=N too for another draw of the data")
    p.add_argument("--workdir", help="run folder (default: runs/<kind>-<date>-<time>)")
    p.add_argument("--save-every", type=_steps_or_fraction,
                   help="checkpoint every N steps (async), or every such fraction of the run (0.2); "
                        "0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--full", action="store_true", default=None, help="train every weight instead of LoRA")
    p.add_argument("--dry-run", action="store_true", help="print shapes, shardings and the memory estimate; exit")
    p.add_argument("--log-examples", action="store_true", default=None,
                   help="allow note text in logs (off by default: notes are PHI)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed input lines")
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
    "temperature": (lambda v: 0 <= v < float("inf"), "a finite number >= 0 (0: greedy)"),
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


# the usual launchers' (count, rank) variables, read when the flags are not given: JAX's own names, Slurm's srun
# step, Open MPI's mpirun, and PMI (MPICH / Intel MPI)
CLUSTER_VARIABLES = (("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"), ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                     ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"))


def multi_host_settings(args, cluster_env: bool = True) -> tuple[str | None, int, int | None]:
    """``(coordinator, processes, process id)`` from the flags, else (``cluster_env``) the environment:
    ``CANCERLLM_NUM_PROCESSES``, then the first of ``CLUSTER_VARIABLES`` that is set for the count and its rank, and
    ``JAX_COORDINATOR_ADDRESS`` for the coordinator. Errors name the flag or variable a value came from, and what
    is missing."""
    count_name, rank_name = "--num-processes", "--process-id"
    nproc, pid = args.num_processes, args.process_id
    rank_source = "--process-id I"  # what gives the rank with this count
    if nproc is None and cluster_env and os.environ.get("CANCERLLM_NUM_PROCESSES", "").strip():
        nproc, count_name = _env_int("CANCERLLM_NUM_PROCESSES", 1, ""), "CANCERLLM_NUM_PROCESSES"
    for count_var, rank_var in CLUSTER_VARIABLES if cluster_env else ():
        if nproc is None and os.environ.get(count_var, "").strip():
            nproc, count_name, rank_source = _env_int(count_var, 1, ""), count_var, f"--process-id I or {rank_var}"
            if pid is None and os.environ.get(rank_var, "").strip():
                pid, rank_name = _env_int(rank_var, 0, ""), rank_var
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise UserError(f"{count_name} must be at least 1, got {nproc}")
    if pid is not None and not 0 <= pid < nproc:
        raise UserError(f"{rank_name} must be in 0 … {nproc - 1} ({count_name} {nproc}), got {pid}")
    coordinator = args.coordinator
    if coordinator is None and nproc > 1:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    if args.coordinator or nproc > 1:
        if nproc < 2:  # --coordinator given for one process
            raise UserError(f"--coordinator {args.coordinator} is for a multi-host run, which needs --num-processes N "
                            "(>= 2) and --process-id I; leave --coordinator out to run this process alone")
        missing = []
        if not coordinator:
            missing.append("a coordinator (--coordinator HOST:PORT, or JAX_COORDINATOR_ADDRESS)")
        if pid is None:
            missing.append(f"a process id ({rank_source})")
        if missing:
            seen = f" ({count_name}={nproc})" if count_name != "--num-processes" else ""
            raise UserError(f"a multi-host run{seen} needs {' and '.join(missing)}; --num-processes 1 runs this "
                            "process alone")
    return coordinator, nproc, pid


def coordinator_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → ``(host, port)``; anything else is one error (JAX crashed on it)."""
    host, sep, port = str(text).strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ":" in host and not str(text).strip().startswith("["):
        raise UserError(f"coordinator {text!r}: an IPv6 address goes in brackets, [ADDRESS]:PORT")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"coordinator {text!r}: expected HOST:PORT with a port in 1 … 65535 (e.g. 10.0.0.1:12355)")
    return host, int(port)


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Until process 0's coordinator accepts connections; a UserError after ``timeout_s`` (JAX would abort the
    process with a C++ stack trace instead)."""
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                why = e.strerror or e
                raise UserError(f"cannot reach the coordinator {host}:{port} after {timeout_s:.0f} s ({why}): start "
                                "process 0 (it runs the coordinator), and check the address and that the port is "
                                "open") from None
            time.sleep(0.5)


def check_coordinator_port_free(port: int) -> None:
    """Process 0 binds ``[::]:PORT`` for the coordinator; a port in use crashed JAX there (a segfault, no message).
    Bound as gRPC binds it (``SO_REUSEADDR``): a port left in TIME_WAIT by a run that just died is free."""
    import socket

    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserError(f"the coordinator's port {port} is in use on this machine (process 0 runs the "
                                    "coordinator there): pick a free port for --coordinator") from None
                continue
            return


def start_runtime(args, mesh_text: str, cluster_env: bool = True) -> None:
    """Before JAX starts: multi-host initialisation and, on CPU hosts, enough host devices for the mesh
    (``cluster_env``: a cluster launcher's variables may start a multi-host run, see ``multi_host_settings``)."""
    from cancerllm_jax.sharding import ensure_host_devices, parse_mesh

    d, m = parse_mesh(mesh_text)
    coordinator, nproc, pid = multi_host_settings(args, cluster_env)
    if nproc > 1:
        host, port = coordinator_host_port(coordinator)
        if (d * m) % nproc:
            raise UserError(f"mesh {d}x{m} ({d * m} devices) does not split over {nproc} processes")
        ensure_host_devices((d * m) // nproc, quiet=pid != 0)
        timeout = max(1, _env_int("CANCERLLM_INIT_TIMEOUT", 120))
        if pid == 0:
            check_coordinator_port_free(port)
        else:
            wait_for_coordinator(host, port, timeout)
        import jax

        heartbeat = max(1, _env_int("CANCERLLM_HEARTBEAT_TIMEOUT", 60))
        try:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc, process_id=pid,
                                       initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat,
                                       shutdown_timeout_seconds=max(1, _env_int("CANCERLLM_SHUTDOWN_TIMEOUT", 60)))
        except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            role = "start the coordinator on" if pid == 0 else "join the coordinator at"
            raise UserError(f"process {pid} could not {role} {coordinator} ({what}); on process 0, HOST must be "
                            "this machine and PORT free") from None
    else:
        ensure_host_devices(d * m)


def _env_int(name: str, default: int, unit: str = " of seconds") -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"{name}={value!r}: expected a whole number{unit}") from None


def run_folder(args, kind: str) -> str:
    """``--workdir``, else a new ``runs/<kind>-<date>-<time>``; ``--resume`` without ``--workdir`` is refused (it
    would start a new run in a new folder, the saved one never found)."""
    if args.workdir:
        return args.workdir
    if args.resume:
        raise UserError(f"--resume continues the run in --workdir: name its folder (a run started without --workdir "
                        f"is in runs/{kind}-<date>-<time>)")
    return os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def announce(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def announce_privacy(log_examples: bool) -> None:
    """Say at start when note text may be logged (``--log-examples``); by default it never is."""
    if log_examples:
        announce("--log-examples is ON: note text (possibly PHI) may appear in this run's console output and logs; "
                 "leave the flag out to keep note text out of everything but your prediction files")


def run_child(cmd: list[str], stdout, what: str, cwd: str | None = None) -> int:
    """Run ``cmd`` (output to the file ``stdout``) to its end and return its exit code. A SIGTERM or Ctrl-C to this
    process is passed on as SIGTERM, which a training run takes as "save the step you finished, then stop" (and takes
    once, should the terminal's Ctrl-C have reached it too); once the child has ended, ``ChildStopped`` says so
    (``what``: the child, for the message). A second signal (Ctrl-C or SIGTERM) kills the child at once. The child is
    never left running on its own: the handlers are set before it starts, so a signal while it starts is passed on
    once it runs (a Ctrl-C there used to end this process and leave the child training)."""
    got: list[str] = []
    child: dict = {"proc": None, "sent": 0}

    def forward() -> None:  # each signal received and not yet passed on: the first as SIGTERM, a later one as a kill
        proc = child["proc"]
        while proc is not None and proc.poll() is None and child["sent"] < len(got):
            child["sent"] += 1
            if child["sent"] == 1:
                proc.send_signal(signal.SIGTERM)
            else:  # a second signal of either kind: stop the child at once
                proc.kill()

    def pass_on(signum, _frame=None) -> None:
        got.append("SIGINT" if signum == signal.SIGINT else "SIGTERM")
        forward()

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, pass_on)
        except ValueError:  # not the main thread: no handler can be set there
            pass
    try:
        child["proc"] = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd)
        forward()  # a signal that came while it started
        code = child["proc"].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        proc = child["proc"]
        if proc is not None and proc.poll() is None:  # an error of this process's own: the child does not outlive it
            proc.kill()
            proc.wait()
    if got:
        raise ChildStopped(got[0], what)
    return code
