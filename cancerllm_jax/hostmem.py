"""Keep freed host memory inside the process when JAX runs on the CPU (glibc only).

XLA:CPU allocates every step's temporaries afresh (one block of ~3 GB for a SmolLM2-135M LoRA step at 4 × 256
tokens) and glibc hands such blocks back to the kernel when they are freed, so the next step page-faults all of
them in again: ~725,000 faults and ~3.5 s of kernel time per 10 s step on the 2-core project machine. Serving
large blocks from the heap and never trimming it makes the steps reuse the same pages (0 faults; 9.7 → 8.1 s per
step). The price is the usual one of a caching allocator: the process keeps its peak host memory.

One heap that is never trimmed can also grow: when a small block is placed inside the hole a step's temporaries
left (a data thread's batch, while the step ran), the next step's block no longer fits there and goes on top, and
on a busy host this repeated every step (+6.6 GB per SmolLM2 step at 4 x 512 tokens: 21 GB after three steps).
``release_stranded_memory``, called by the training loop before each step, gives such holes' pages back
(``malloc_trim``) when they have grown by half a step's temporaries since the last time, so the step that then goes
on top does not add to them; a heap whose free memory sits at its top, as in the steady state, is left alone (and not
faulted in again).

Applied once, at ``import cancerllm_jax``, before JAX starts its threads; only where the CPU is the JAX backend
(``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin installed). ``CANCERLLM_HOST_MALLOC=system`` turns it off; a value
other than ``keep`` / ``system`` is reported on stderr and treated as ``system``.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import platform
import pkgutil
import sys

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ACCELERATOR_PLUGINS = ("cuda", "rocm", "tpu")


def cpu_is_the_backend() -> bool:
    """True when JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator plugin is installed."""
    chosen = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
    if chosen:
        return chosen.split(",")[0].strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    names = [m.name for m in pkgutil.iter_modules()]
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return not any(acc in name and ("jax" in name or "xla" in name) for name in names for acc in ACCELERATOR_PLUGINS)


_KEPT = False  # whether keep_freed_memory applied the setting to this process


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, loaded once (an OSError where there is none)."""
    return ctypes.CDLL("libc.so.6")


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 <malloc.h>
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def stranded_bytes() -> int:
    """Free heap bytes below the heap's top (holes), or 0 where glibc cannot say (``mallinfo2``)."""
    try:
        mallinfo2 = _libc().mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.fordblks - info.keepcost)


_stranded_after_trim = 0  # stranded bytes right after the last trim (their pages given back, still counted free)


def release_stranded_memory(limit: int) -> bool:
    """Where ``keep_freed_memory`` applied: give the pages of free heap blocks back to the kernel (``malloc_trim``)
    when the free bytes below the heap's top have grown by more than ``limit`` since the last trim (blocks already
    given back still count as free); returns whether it did."""
    global _stranded_after_trim
    if not _KEPT:
        return False
    stranded = stranded_bytes()
    _stranded_after_trim = min(_stranded_after_trim, stranded)  # holes reused since: count from what is left
    if stranded - _stranded_after_trim <= limit:
        return False
    trimmed = bool(_libc().malloc_trim(0))
    _stranded_after_trim = stranded_bytes()
    return trimmed


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from one never-trimmed heap; returns whether it was applied."""
    choice = os.environ.get("CANCERLLM_HOST_MALLOC", "keep").strip().lower() or "keep"
    if choice not in ("keep", "system"):
        print(f"cancerllm_jax: CANCERLLM_HOST_MALLOC={os.environ['CANCERLLM_HOST_MALLOC']!r} is not 'keep' or "
              "'system'; using glibc's defaults ('system')", file=sys.stderr)
    if choice != "keep":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or not cpu_is_the_backend():
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    # one arena: XLA's worker threads allocate the step's temporaries, and a thread arena would mmap a block
    # this large whatever the settings; no mmap for large blocks; -1 = never give the heap's top back
    global _KEPT
    _KEPT = all(mallopt(param, value) == 1 for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                                (M_TRIM_THRESHOLD, -1)))
    return _KEPT
