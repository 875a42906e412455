"""The CPU backend's host-memory setting (cancerllm_jax/hostmem.py): freed blocks are reused, not re-faulted."""
import json
import os
import platform
import subprocess
import sys

import pytest

from cancerllm_jax.hostmem import cpu_is_the_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free a 256 MB block twice, as XLA:CPU's per-step temporaries come and go (from a worker
# thread); count the page faults of the second round.
PROBE = r"""
import ctypes, json, resource, threading
import cancerllm_jax
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def block():
    p = libc.malloc(256 * 2**20); ctypes.memset(p, 1, 256 * 2**20); libc.free(p)
def work(out):
    block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
print(json.dumps({"kept": cancerllm_jax.HOST_MEMORY_KEPT, "faults": out[0]}))
"""


def probe(setting: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", CANCERLLM_HOST_MALLOC=setting, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_freed_blocks_are_reused_on_cpu():
    kept, system = probe("keep"), probe("system")
    assert kept["kept"] and not system["kept"]
    assert kept["faults"] < 1000, kept  # the freed 256 MB come back without faulting
    assert system["faults"] > 10 * max(kept["faults"], 100), system  # glibc's default: returned, faulted again


def test_backend_detection(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_is_the_backend()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_is_the_backend()


def test_unknown_setting_is_reported(monkeypatch, capsys):
    from cancerllm_jax.hostmem import keep_freed_memory

    monkeypatch.setenv("CANCERLLM_HOST_MALLOC", "kepp")
    assert not keep_freed_memory()
    assert "CANCERLLM_HOST_MALLOC='kepp'" in capsys.readouterr().err
    monkeypatch.setenv("CANCERLLM_HOST_MALLOC", "system")
    assert not keep_freed_memory()
    assert capsys.readouterr().err == ""
