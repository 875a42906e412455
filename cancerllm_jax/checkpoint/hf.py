"""Hugging Face safetensors ⇄ our parameter tree, tensor by tensor.

HF keeps one ``[out, in]`` tensor per layer; we keep ``[layers, in, out]``. Import fills preallocated stacked
arrays one HF tensor at a time (memory-mapped reads); export streams ~5 GB shards one tensor at a time (a layer
slice, transposed and cast), so a 7B conversion never holds two copies of the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import ml_dtypes  # also registers bfloat16 with numpy: safetensors reads BF16 tensors through it
import numpy as np

from cancerllm_jax.config import ModelConfig, hf_eos_value, read_hf_config, read_json_file, to_hf_config
from cancerllm_jax.errors import UserError

log = logging.getLogger(__name__)

LAYER_KEYS = {  # ours -> HF suffix under model.layers.{i}.
    ("attn_norm",): "input_layernorm.weight",
    ("mlp_norm",): "post_attention_layernorm.weight",
    ("q", "kernel"): "self_attn.q_proj.weight",
    ("k", "kernel"): "self_attn.k_proj.weight",
    ("v", "kernel"): "self_attn.v_proj.weight",
    ("o", "kernel"): "self_attn.o_proj.weight",
    ("gate", "kernel"): "mlp.gate_proj.weight",
    ("up", "kernel"): "mlp.up_proj.weight",
    ("down", "kernel"): "mlp.down_proj.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SHARD_BYTES = 5 * 1024**3


_WARNED_STALE_INDEX: set[str] = set()


def safetensors_files(folder: str) -> dict[str, str]:
    """Map tensor name → file, from ``model.safetensors`` or else a sharded ``model.safetensors.index.json`` (the
    order transformers looks in: its ``save_pretrained`` leaves a stale index beside a new single file)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        if os.path.isfile(index) and os.path.abspath(folder) not in _WARNED_STALE_INDEX:  # once per folder
            _WARNED_STALE_INDEX.add(os.path.abspath(folder))
            log.warning("%s: has both model.safetensors and model.safetensors.index.json; reading model.safetensors "
                        "(as transformers does)", folder)
        try:
            with safe_open(single, framework="numpy") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # safetensors raises SafetensorError / OSError on a corrupt header
            raise UserError(f"{single}: corrupt or not a safetensors file ({e})") from None
    if os.path.isfile(index):
        try:
            weight_map = read_json_file(index)["weight_map"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index (no 'weight_map': {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to file names")
        # the names must stay inside the folder; a shard may be a link elsewhere (the Hugging Face cache links each
        # snapshots/<rev>/ file to ../../blobs/<sha>)
        root = os.path.abspath(folder)
        for fname in set(weight_map.values()):
            if os.path.commonpath([root, os.path.normpath(os.path.join(root, fname))]) != root:
                raise UserError(f"{index} names {fname}, which is outside {folder}")
            if not os.path.isfile(os.path.join(folder, fname)):
                raise UserError(f"{index} names {fname}, which is missing from {folder}")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(folder)):
        raise UserError(f"{folder}: only pickle weights (.bin/.pt) found; convert them to safetensors first "
                        "(pickle files are never loaded)")
    raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file, the file mapped only while it is copied out: pages of a mapping kept open
    stay in the process's resident memory, so read shards kept open counted as a second copy of the model."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="numpy")
    except Exception as e:
        raise UserError(f"{path}: corrupt or not a safetensors file ({e})") from None
    try:
        with handle as f:
            return f.get_tensor(name)
    except Exception as e:
        raise UserError(f"{path}: cannot read tensor {name} ({e})") from None


def _check(where: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise UserError(f"{where}: shape {tuple(arr.shape)}, expected {tuple(shape)} from config.json")
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":  # int8/uint8 quantised or corrupt weights
        raise UserError(f"{where}: dtype {arr.dtype.name}, expected floating-point weights (quantised "
                        f"checkpoints are not supported; dequantise to float16/bfloat16/float32 first)")
    return arr


def _wider_dtype(a: np.dtype, b: np.dtype) -> np.dtype:
    """The float dtype that holds both ``a`` and ``b`` exactly (float16 and bfloat16: float32)."""
    if a == b or a.itemsize != b.itemsize:
        return a if a.itemsize >= b.itemsize else b
    return np.dtype(np.float32)


def _narrow_float64(narrowed: list):
    """A cast that keeps a tensor's dtype, except float64 → float32 (each such tensor's shape appended to
    ``narrowed``: not the tensor, which would be kept in memory)."""
    def cast(a: np.ndarray) -> np.ndarray:
        if a.dtype != np.float64:
            return a
        narrowed.append(a.shape)
        return a.astype(np.float32)
    return cast


def read_hf(folder: str, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, params)`` from an HF folder; ``dtype`` None keeps the file's dtype (bit-exact)."""
    from cancerllm_jax.model import check_fits

    if not os.path.isdir(folder):
        raise UserError(f"model folder not found: {folder}")
    cfg = read_hf_config(folder)
    files = safetensors_files(folder)
    names = set(files)
    used = set()
    wide = []  # float64 tensors: JAX (x64 off) computes in at most 32 bits, so they are read as float32, said once
    cast = _narrow_float64(wide) if dtype is None else (lambda a: a.astype(_np_dtype(dtype)))
    n = cfg.num_layers
    shapes = _hf_shapes(cfg)

    def take(name):
        if name not in names:
            raise UserError(f"{folder}: tensor {name} is missing")
        used.add(name)
        where = f"{files[name]}: tensor {name}"
        t = _check(where, _read_tensor(files[name], name), _expected_shape(shapes, name))
        if dtype is not None:
            check_fits(where, t, _np_dtype(dtype))
        return t

    embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    tied_head_only = cfg.tie_embeddings and embed_name not in names and head_name in names
    embed = cast(take(head_name if tied_head_only else embed_name))  # tied: transformers fills one from the other
    params: dict = {"embed": embed, "final_norm": cast(take("model.norm.weight")), "layers": {}}
    if cfg.tie_embeddings and head_name in names and head_name not in used:
        head = cast(take(head_name))  # tied, and a head is stored too: a copy, or a head trained apart
        if not np.array_equal(head, embed):  # as transformers: the stored head is used, the weights untied
            log.warning("%s: config.json ties the embeddings but lm_head.weight differs from them; using the stored "
                        "head (as transformers does): the model is loaded untied", folder)
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
            params["lm_head"] = np.ascontiguousarray(head.T)
    elif not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(cast(take(head_name)).T)
    for ours, suffix in LAYER_KEYS.items():
        first = take(f"model.layers.0.{suffix}")
        is_kernel = ours[-1] == "kernel"
        shape = (n,) + (first.shape[::-1] if is_kernel else first.shape)
        stacked = np.empty(shape, dtype=cast(first[:1]).dtype)
        for i in range(n):
            t = cast(first if i == 0 else take(f"model.layers.{i}.{suffix}"))
            if (wider := _wider_dtype(stacked.dtype, t.dtype)) != stacked.dtype:
                stacked = stacked.astype(wider)  # layers stored in several dtypes: all in the wider one, no rounding
            stacked[i] = t.T if is_kernel else t
        node = params["layers"]
        for k in ours[:-1]:
            node = node.setdefault(k, {})
        node[ours[-1]] = stacked
    if wide:
        log.warning("%s: %d float64 tensor(s) read as float32: JAX computes in at most 32 bits here", folder,
                    len(wide))
    _refuse_extra(folder, cfg, names - used)
    return cfg, params


def check_hf_tensors(folder: str) -> None:
    """What ``read_hf`` would refuse about ``folder``'s tensors, from the safetensors headers alone (no weight is
    read): a truncated or corrupt file, a tensor missing, of another shape than config.json gives, not floating
    point, or not part of the model."""
    from safetensors import safe_open

    cfg = read_hf_config(folder)
    files = safetensors_files(folder)  # names the files; a sharded folder's shards are opened below
    shapes = _hf_shapes(cfg)
    layer_names = [n for n in shapes if ".*." in n]
    wanted = {n for n in shapes if ".*." not in n} | {n.replace(".*.", f".{i}.") for n in layer_names
                                                      for i in range(cfg.num_layers)}
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if cfg.tie_embeddings:  # one of the two is enough (transformers fills one from the other)
        wanted -= {head} if embed in files else {embed}
    for fname in sorted(set(files.values())):
        try:
            handle = safe_open(fname, framework="numpy")  # refuses a truncated file ("not fully covered")
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise UserError(f"{fname}: corrupt or not a safetensors file ({e})") from None
        with handle as f:
            for name in [n for n, where in files.items() if where == fname and (n in shapes or
                                                                               _layer_generic(n) in shapes)]:
                t = f.get_slice(name)
                expected = _expected_shape(shapes, name)
                if tuple(t.get_shape()) != tuple(expected):
                    raise UserError(f"{fname}: tensor {name}: shape {tuple(t.get_shape())}, expected "
                                    f"{tuple(expected)} from config.json")
                if t.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                    raise UserError(f"{fname}: tensor {name}: dtype {t.get_dtype()}, expected floating-point "
                                    "weights (quantised checkpoints are not supported)")
    missing = sorted(wanted - set(files))
    if missing:
        raise UserError(f"{folder}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    _refuse_extra(folder, cfg, set(files) - wanted - {embed, head})


def _refuse_extra(folder: str, cfg: ModelConfig, names: set[str]) -> None:
    """Tensors no part of the model reads (a rotary table transformers once saved aside) are one error."""
    extra = sorted(n for n in names if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise UserError(f"{folder}: unexpected tensor(s) {extra[:5]}{'…' if len(extra) > 5 else ''} "
                        f"(not part of a {cfg.model_type} model with this config)")


def _expected_shape(shapes: dict[str, tuple], name: str) -> tuple:
    """A tensor's shape from ``_hf_shapes``, a layer's by its generic name."""
    return shapes[name] if name in shapes else shapes[_layer_generic(name)]


def _layer_generic(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2] + ["*"] + parts[3:])


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    s = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (cfg.q_size, d), "self_attn.k_proj.weight": (cfg.kv_size, d),
             "self_attn.v_proj.weight": (cfg.kv_size, d), "self_attn.o_proj.weight": (d, cfg.q_size),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    s.update({f"model.layers.*.{k}": v for k, v in layer.items()})
    return s


def _np_dtype(name: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _hf_tensor_plan(cfg: ModelConfig, params: dict, dtype: str | None = None, tied_head: bool = False):
    """``(hf_name, shape, dtype, load)`` per tensor in HF's order, without reading any; ``load()`` gives the tensor
    (``[out, in]``, contiguous, cast to ``dtype``). ``tied_head``: tied embeddings are stored as ``lm_head.weight``
    too (as the source folder did)."""
    target = None if dtype is None else np.dtype(_np_dtype(dtype))

    def entry(name, leaf, index=None, transpose=False):
        shape = tuple(leaf.shape[1:] if index is not None else leaf.shape)
        shape = shape[::-1] if transpose else shape

        def load():
            t = np.asarray(leaf[index] if index is not None else leaf)
            t = np.ascontiguousarray(t.T if transpose else t)
            if target is not None and t.dtype != target:
                t = t.astype(target)
            return t

        return name, shape, target or np.dtype(leaf.dtype), load

    yield entry("model.embed_tokens.weight", params["embed"])
    for i in range(cfg.num_layers):
        for ours, suffix in LAYER_KEYS.items():
            node = params["layers"]
            for k in ours:
                node = node[k]
            yield entry(f"model.layers.{i}.{suffix}", node, i, transpose=ours[-1] == "kernel")
    yield entry("model.norm.weight", params["final_norm"])
    if not cfg.tie_embeddings:
        yield entry("lm_head.weight", params["lm_head"], transpose=True)
    elif tied_head:
        yield entry("lm_head.weight", params["embed"])


def _nbytes(entry) -> int:
    """The bytes of a planned tensor (``_hf_tensor_plan``'s ``(name, shape, dtype, load)``)."""
    return int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                      np.dtype(ml_dtypes.bfloat16): "BF16"}


def _write_safetensors(path: str, entries: list, metadata: dict[str, str]) -> None:
    """One safetensors file from ``(name, shape, dtype, load)`` entries, streamed: the header is written from the
    shapes, then each tensor as it is loaded, so only one tensor is in memory at a time (``safetensors``'
    ``save_file`` takes a dict of every tensor of the shard and copies them all to bytes)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        name, shape, dt, _ = entry
        header[name] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(entry)]}
        offset += _nbytes(entry)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads its header
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dt, load in entries:
            t = load()
            if t.shape != tuple(shape) or t.dtype != dt:
                raise AssertionError(f"{name}: planned {shape} {dt}, got {t.shape} {t.dtype}")
            f.write(t.reshape(-1).view(np.uint8).data)
            del t


def write_hf(out_dir: str, cfg: ModelConfig, params: dict, overwrite: bool = False,
             tokenizer_dir: str | None = None, shard_bytes: int = SHARD_BYTES,
             generation_config: str | None = None, source_config: dict | None = None,
             dtype: str | None = None, tied_head: bool = False) -> list[str]:
    """Write ``config.json`` + safetensors (sharded at ``shard_bytes`` with an index) atomically, one tensor in
    memory at a time (cast to ``dtype``, if given), with the tokenizer files of ``tokenizer_dir`` and a
    ``generation_config.json`` naming every EOS id (the source's settings kept: the one among the tokenizer files,
    else the file ``generation_config``); ``source_config``: the source's config.json, whose keys the model does not
    read are kept (``to_hf_config``); without it such keys take transformers' defaults. ``tied_head``: tied
    embeddings are also stored as ``lm_head.weight``."""
    from cancerllm_jax.checkpoint.orbax_io import atomic_dir, copy_tokenizer_files

    if dtype is not None:  # every weight checked before anything is written (float16 refuses what would be inf)
        import jax

        from cancerllm_jax.model import check_fits

        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            where = jax.tree_util.keystr(path, simple=True, separator=".")
            check_fits(f"--dtype {dtype}: weight {where}", leaf, _np_dtype(dtype))
    plan = list(_hf_tensor_plan(cfg, params, dtype, tied_head))
    shards, size = [[]], 0
    for entry in plan:
        if size and size + _nbytes(entry) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry)
    total_size = sum(map(_nbytes, plan))
    total = len(shards)
    names = (["model.safetensors"] if total == 1 else
             [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)])
    with atomic_dir(out_dir, overwrite) as tmp:
        for fname, entries in zip(names, shards):
            _write_safetensors(os.path.join(tmp, fname), entries, {"format": "pt"})
        if total > 1:
            index = {"metadata": {"total_size": int(total_size)},
                     "weight_map": {e[0]: fname for fname, entries in zip(names, shards) for e in entries}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        hf_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(plan[0][2]),
                                                                                           "float32")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_hf_config(cfg, hf_dtype, source_config), f, indent=2)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if generation_config and not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            shutil.copy2(generation_config, os.path.join(tmp, "generation_config.json"))
        write_generation_config(tmp, cfg)
    return names


def write_generation_config(folder: str, cfg: ModelConfig) -> None:
    """``generation_config.json`` naming every EOS id, as transformers' ``save_pretrained`` writes it; one copied
    from the source keeps its other settings."""
    path = os.path.join(folder, "generation_config.json")
    gen = {}
    if os.path.isfile(path):
        gen = read_json_file(path)
        if not isinstance(gen, dict):
            raise UserError(f"{path}: expected a JSON object")
    for key, value in (("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id)):
        if value is not None:
            gen.setdefault(key, value)
    gen["eos_token_id"] = hf_eos_value(cfg)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
