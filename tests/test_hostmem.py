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


# A step's 256 MB block freed below a small block allocated while it was live (a hole the next, larger block
# cannot use): the hole's pages stay resident until release_stranded_memory gives them back; a block freed at the
# heap's top (the steady state) is left alone.
STRANDED = r"""
import ctypes, json
import cancerllm_jax
from cancerllm_jax.hostmem import release_stranded_memory, stranded_bytes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
big = libc.malloc(256 * 2**20); ctypes.memset(big, 1, 256 * 2**20)
at_top = release_stranded_memory(64 * 2**20)  # nothing stranded yet
pin = libc.malloc(2**20)  # larger than any free block: placed on the top, above the big one
libc.free(big)
before, held = rss(), stranded_bytes()
released = release_stranded_memory(64 * 2**20)
freed = before - rss()
again = release_stranded_memory(64 * 2**20)  # its pages are back already: no trim (and no faults) every step
print(json.dumps({"at_top": at_top, "held": held, "released": released, "freed": freed, "again": again}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_a_stranded_hole_is_given_back():
    env = dict(os.environ, JAX_PLATFORMS="cpu", CANCERLLM_HOST_MALLOC="keep", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", STRANDED], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["at_top"] and got["held"] >= 256 * 2**20 and got["released"], got
    assert got["freed"] > 200 * 2**20 and not got["again"], got  # its pages went back to the kernel, once
