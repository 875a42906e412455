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
os.makedirs(_cache, exist_ok=True)
# Environment variables, so that launcher subprocesses inherit them; JAX reads them when it is first imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
