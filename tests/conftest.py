"""Test session set-up that must happen before JAX is imported anywhere.

* 10 CPU host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=10``, only if XLA_FLAGS does not set a
  count already), so in-process tests can build the meshes 1x1, 2x5 and 10x1. Tests that use the default 1x1 mesh
  simply take the first device.
* A persistent JAX compilation cache shared by this session and the launcher subprocesses it starts (they inherit
  the environment). On the 2-core CPU a tiny-model launcher run took 35 s cold and 12 s warm: each eager random
  op of the model's initialisation (~0.4 s of XLA compile each) and the train step itself are read back from the
  cache. Set ``CANCERLLM_TEST_JAX_CACHE`` to a folder to keep the cache between sessions; by default it is a fresh
  temporary folder removed at the end, so every session measures the same thing.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

N_HOST_DEVICES = 10

if "jax" in sys.modules:  # pragma: no cover - a plugin imported JAX first
    print("conftest: jax was imported before tests/conftest.py; the 10 host devices may be missing",
          file=sys.stderr)

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={N_HOST_DEVICES}".strip()

_cache = os.environ.get("CANCERLLM_TEST_JAX_CACHE")
if not _cache:
    _cache = tempfile.mkdtemp(prefix="cancerllm-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["CANCERLLM_TEST_JAX_CACHE"] = _cache  # pytest-xdist's workers share it; this process removes it
os.makedirs(_cache, exist_ok=True)
# Environment variables, so that launcher subprocesses inherit them; JAX reads them when it is first imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# ------------------------------------------------------------------------------------- parallel runs (-n auto)
# The README's test command runs the suite on pytest-xdist workers (`-n auto`): 2 on the 2-core CI host, where it
# took 11.6 min instead of 19 min one test at a time. Each worker is a process of its own (10 host devices, its
# own compiled functions); they share the compilation cache above.
GIB_PER_WORKER = 4  # two workers with their launcher subprocesses held about 5 GiB together (`free`, sampled)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU core, fewer where host memory is short (PYTEST_XDIST_AUTO_NUM_WORKERS wins)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = avail_kib // (GIB_PER_WORKER * 2**20)
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def pytest_configure(config):
    """Under xdist a module's tests stay on one worker, so its module fixtures are built once (an explicit --dist
    is kept)."""
    given = config.invocation_params.args
    if getattr(config.option, "numprocesses", None) and not any(str(a).startswith(("--dist", "-d")) for a in given):
        config.option.dist = "loadscope"
