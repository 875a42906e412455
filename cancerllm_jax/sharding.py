"""Device meshes and shardings: ``"DxM"`` → a ``('data', 'model')`` mesh; logical axes → PartitionSpecs.

The batch is split over ``data``; frozen weights are FSDP-sharded over ``data`` where a dimension divides;
heads, KV heads, MLP hidden and vocabulary over ``model``. A dimension that does not divide its mesh axis is
replicated, with a one-line notice.
"""
from __future__ import annotations

import os
import re
import sys

from cancerllm_jax.errors import UserError

# logical axis -> mesh axis (None = replicated)
AXIS_RULES = {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model", "embed": "data",
              "batch": "data", "layers": None, "norm": None, "lora_rank": None}


def parse_mesh(text) -> tuple[int, int]:
    """``"10x1"`` (or ``(10, 1)``) → ``(10, 1)``; anything else is a UserError."""
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(type(n) is int for n in text):
        text = f"{text[0]}x{text[1]}"
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text) if isinstance(text, str) else None
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"mesh {text!r}: expected DATAxMODEL with positive integers, e.g. 10x1 or 2x4")
    return int(m.group(1)), int(m.group(2))


MAX_HOST_DEVICES = 1024


def ensure_host_devices(n: int, quiet: bool = False) -> None:
    """Before JAX starts: on a CPU-only host, ask XLA for ``n`` host devices (a no-op when a GPU/TPU is present).

    A host device count already in ``XLA_FLAGS`` is replaced (and the notice says so): the mesh asked for wins.
    Once JAX's backends exist nothing can change; ``make_mesh`` then reports a mesh that does not fit.
    """
    n = max(n, 1)
    if n > MAX_HOST_DEVICES:  # XLA would spend minutes creating them before any check could run
        raise UserError(f"the mesh asks for {n} devices on this host; at most {MAX_HOST_DEVICES} per process")
    flags = os.environ.get("XLA_FLAGS", "")
    old = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if "jax" in sys.modules:
        import jax

        try:
            backend_ready = jax._src.xla_bridge.backends_are_initialized()  # noqa: SLF001
        except AttributeError:
            backend_ready = True
        if backend_ready:
            return
        jax.config.update("jax_num_cpu_devices", n)  # takes precedence over XLA_FLAGS
    else:
        if old:
            flags = flags.replace(old.group(0), "").strip()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    if old and int(old.group(1)) != n and not quiet:
        print(f"note: providing {n} host devices for the mesh instead of the {old.group(1)} that XLA_FLAGS asks for "
              f"(CPU devices: used when JAX runs on the CPU; a GPU host uses its GPUs)", file=sys.stderr)
    elif n > 1 and not quiet:
        print(f"note: providing {n} host devices for the mesh (CPU devices: used when JAX runs on the CPU; a GPU "
              f"host uses its GPUs)", file=sys.stderr)


def provide_host_devices(n: int) -> None:
    """``ensure_host_devices(n)`` for a library call (``cj.load(mesh=...)``): only when more devices than a CPU host
    has by default (or than ``XLA_FLAGS`` asks for) are needed, so a user's own device count is never lowered."""
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    have = int(forced.group(1)) if forced else 1
    if "jax" in sys.modules:  # a count set with jax.config.update("jax_num_cpu_devices", N)
        import jax

        have = max(have, int(getattr(jax.config, "jax_num_cpu_devices", -1) or -1))
    if n > have:
        ensure_host_devices(n, quiet=True)


def make_mesh(shape: tuple[int, int] | str):
    """A ``('data', 'model')`` mesh with Auto axis types over the available devices."""
    import jax
    from jax.sharding import AxisType

    d, m = parse_mesh(shape) if isinstance(shape, str) else shape
    have = jax.device_count()
    if d * m > have:
        hint = ""
        forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        if jax.default_backend() == "cpu":
            flag = (f"XLA_FLAGS sets --xla_force_host_platform_device_count={forced.group(1)} per process; "
                    if forced else "")
            hint = (f" ({flag}the host devices are fixed when JAX starts: before any JAX computation, run "
                    f"jax.config.update('jax_num_cpu_devices', {d * m}) or set XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={d * m}; the launch/ scripts do this themselves)")
        raise UserError(f"mesh {d}x{m} needs {d * m} devices but {have} {jax.default_backend()} device(s) exist"
                        f"{hint}")
    if jax.process_count() > 1 and d * m != have:
        raise UserError(f"mesh {d}x{m} uses {d * m} of the {have} devices of {jax.process_count()} processes; a "
                        f"multi-process mesh must use every device ({have // jax.process_count()} per process)")
    if d % jax.process_count():  # each process feeds its own rows: a data shard may not span two processes
        raise UserError(f"mesh {d}x{m}: the data axis ({d}) must be a multiple of the {jax.process_count()} "
                        f"processes (each process reads its own rows of the batch, so the model axis must stay "
                        f"within one process's devices)")
    devices = jax.devices()[: d * m]
    return jax.make_mesh((d, m), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _unit(logical: str, size: int, model_cfg) -> int:
    if logical == "heads" and model_cfg is not None:
        return model_cfg.num_heads
    if logical == "kv_heads" and model_cfg is not None:
        return model_cfg.num_kv_heads
    return size


_NOTICED: set = set()


def spec_for(path: str, shape: tuple[int, ...], axes: tuple[str, ...], mesh, model_cfg=None, fsdp: bool = True,
             notice=print):
    """PartitionSpec for one parameter from its logical axes; non-dividing dimensions are replicated."""
    from jax.sharding import PartitionSpec as P

    out, used = [], set()
    for dim, logical in zip(shape, axes):
        axis = AXIS_RULES.get(logical)
        if axis == "data" and not fsdp:
            axis = None
        if axis is None or mesh.shape[axis] == 1 or axis in used:
            out.append(None)
            continue
        if _unit(logical, dim, model_cfg) % mesh.shape[axis]:
            key = (logical, dim, axis, mesh.shape[axis])
            if key not in _NOTICED:
                _NOTICED.add(key)
                notice(f"note: {logical} ({_unit(logical, dim, model_cfg)}) does not divide mesh axis "
                       f"'{axis}' ({mesh.shape[axis]}): replicated")
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return P(*out)


def param_shardings(state_dict: dict, mesh, model_cfg=None, fsdp: bool = True, notice=print) -> dict:
    """NamedShardings for a pure parameter dict (as from ``nnx.to_pure_dict``)."""
    from jax.sharding import NamedSharding

    from cancerllm_jax.model.mistral import PARAM_AXES

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()}
        axes = PARAM_AXES.get(prefix)
        if axes is None or len(axes) != len(node.shape):
            from jax.sharding import PartitionSpec as P

            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(prefix, tuple(node.shape), axes, mesh, model_cfg, fsdp, notice))

    return walk(state_dict, "")


def batch_sharding(mesh):
    """Rows of a ``[B, T]`` batch over ``data``."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P("data", None))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


def device_memory_bytes(mesh) -> int:
    """The memory one device of ``mesh`` has: a GPU's limit, the host's RAM shared by a CPU mesh's devices (each
    may hold a replica); 0 when unknown."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return int((dev.memory_stats() or {}).get("bytes_limit", 0))
    if dev.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // mesh.size
    return 0
