"""Our converted-checkpoint format: ``cancerllm.json`` (model config, dtype) + an Orbax ``params/`` tree.

A checkpoint may also carry unmerged LoRA factors: ``cancerllm.json`` then has ``lora`` (the LoRA config) and
format ``params-lora-v1`` (so code that knows only ``params-v1`` refuses it rather than drop the LoRA), and the
factors are the Orbax tree ``lora/`` (``{"layers": {target: {"lora_a", "lora_b"}}}``, float32).

Writes are atomic: everything goes into a sibling temp folder that is renamed into place at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

from cancerllm_jax.config import LoRAConfig, ModelConfig, to_dict
from cancerllm_jax.errors import UserError, check_can_write

META_FILE = "cancerllm.json"
FORMAT = "cancerllm-jax/params-v1"
FORMAT_LORA = "cancerllm-jax/params-lora-v1"
LEAFWISE_BYTES = 2**30  # a bigger tree is restored one leaf at a time (host memory; see _restore_leafwise)
SAVE_WINDOW_GB = 1  # at most this much of a tree is copied for writing at once (save_params)


def refuse_enclosing_folder(out_dir: str) -> None:
    """An output folder that is or holds the working directory (``.``, ``..``), or is the home folder or ``/``, is
    an error: replacing it (``--overwrite``) would delete the user's files."""
    out = os.path.realpath(os.path.expanduser(out_dir))
    if not os.path.exists(out):
        return
    cwd = os.path.realpath(os.getcwd())
    if out == os.sep:
        where = "the filesystem root"
    elif out == cwd:
        where = "the current folder"
    elif os.path.commonpath([out, cwd]) == out:
        where = "a folder that holds the current folder"
    elif out == os.path.realpath(os.path.expanduser("~")):
        where = "the home folder"
    else:
        return
    raise UserError(f"{out_dir}: the output folder must not be {where} (it is replaced whole); "
                    "give a new folder for the output")


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yield a temp folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename."""
    out_dir = os.path.abspath(out_dir)
    refuse_enclosing_folder(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    check_can_write(out_dir, out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should get the user's usual mode
    try:
        yield tmp
        for root, _, files in os.walk(tmp):  # safetensors' save_file writes 0600: the user's usual mode instead
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_params_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def save_params(out_dir: str, cfg: ModelConfig, params: dict, dtype: str, extra: dict | None = None,
                overwrite: bool = False, tokenizer_dir: str | None = None, lora: LoRAConfig | None = None,
                lora_params: dict | None = None) -> None:
    """Write a params checkpoint (pure dict of arrays, optionally with unmerged LoRA factors) atomically.

    Host (numpy) leaves of ``params`` are replaced in place by CPU ``jax.Array``s, one at a time, and Orbax copies
    at most ``SAVE_WINDOW_GB`` of them at once for writing, uncompressed (float weights barely compress, and the
    compressed copies were one more copy of the model): the model is never held twice (Orbax copies a whole tree of
    numpy arrays before writing it)."""
    import orbax.checkpoint as ocp

    _cpu_arrays_in_place(params)
    with atomic_dir(out_dir, overwrite) as tmp:
        handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=SAVE_WINDOW_GB, save_concurrent_gb=1,
                                              use_compression=False)
        ckptr = ocp.Checkpointer(handler)
        ckptr.save(os.path.join(tmp, "params"), args=ocp.args.PyTreeSave(params))
        if lora is not None:
            ckptr.save(os.path.join(tmp, "lora"), args=ocp.args.PyTreeSave(lora_params))
        ckptr.close()
        meta = {"format": FORMAT if lora is None else FORMAT_LORA, "model": to_dict(cfg), "dtype": dtype,
                **({} if lora is None else {"lora": to_dict(lora)}), **(extra or {})}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)


def replace_leaves_in_place(tree: dict, fn, prefix: str = "") -> None:
    """Replace each leaf of nested dicts by ``fn(dotted path, leaf)``, one leaf at a time (the old one is freed
    before the next is made: a tree converted so is never held twice)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            replace_leaves_in_place(value, fn, f"{prefix}{key}.")
        else:
            tree[key] = fn(f"{prefix}{key}", value)


def _cpu_arrays_in_place(tree: dict) -> None:
    """Replace the non-JAX array leaves of a nested dict by arrays on the CPU device, one leaf at a time."""
    import jax

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS names no cpu: Orbax takes the host arrays as they are (and copies them)
        return
    replace_leaves_in_place(tree, lambda _, v: v if isinstance(v, jax.Array) else  # copied before the next leaf
                            jax.device_put(v, cpu).block_until_ready())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer that ``src`` names, as :func:`~cancerllm_jax.data.tokenizer.load_tokenizer` reads it:
    ``mistral-v1`` or a SentencePiece ``.model`` file (as ``tokenizer.model``), an HF tokenizer folder or its
    ``tokenizer.json``. Returns the names written."""
    from cancerllm_jax.data.tokenizer import mistral_v1_model_file, tokenizer_path

    if src in ("mistral-v1", "mistral"):  # the shipped file is named tokenizer.model.v1
        shutil.copy2(mistral_v1_model_file(), os.path.join(dst, "tokenizer.model"))
        return ["tokenizer.model"]
    src = tokenizer_path(src)
    if os.path.isfile(src) and src.endswith(".model"):
        shutil.copy2(src, os.path.join(dst, "tokenizer.model"))
        return ["tokenizer.model"]
    if os.path.isfile(src) and os.path.basename(src) in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.dirname(os.path.abspath(src))  # the folder that holds it
    if not os.path.isdir(src):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def read_format_json(path: str, name: str, fmt: str | tuple[str, ...]) -> dict:
    """``path/name`` as JSON whose ``format`` field must be ``fmt`` (or one of them); errors name the file."""
    from cancerllm_jax.data.sources import load_json_file

    fmts = (fmt,) if isinstance(fmt, str) else fmt
    if not os.path.isfile(os.path.join(path, name)):
        why = "a folder, not a file" if os.path.isdir(os.path.join(path, name)) else "no such file"
        raise UserError(f"{path}/{name}: unreadable ({why})")
    try:  # not UTF-8, invalid JSON, nested too deeply: path/name:line
        meta = load_json_file(os.path.join(path, name))
    except UserError as e:
        redo = "convert the model again" if name == META_FILE else "start the run again in a new --workdir"
        raise UserError(f"{e}: the file is damaged or unreadable; restore it from a copy, or {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") not in fmts:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{path}/{name}: unknown format {found!r} (expected {' or '.join(fmts)})")
    return meta


def read_meta(path: str) -> dict:
    """``cancerllm.json`` of a converted checkpoint; its ``model`` field (the model config) must be there."""
    meta = read_format_json(path, META_FILE, (FORMAT, FORMAT_LORA))
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{path}/{META_FILE}: no 'model' field (the model config); restore the file, or convert the "
                        "model again")
    if meta["format"] == FORMAT_LORA and not isinstance(meta.get("lora"), dict):
        raise UserError(f"{path}/{META_FILE}: format {FORMAT_LORA} but no 'lora' field (the LoRA config); restore "
                        "the file, or convert the model again")
    return meta


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple]:
    if not hasattr(tree, "items"):  # a leaf: an array, a ShapeDtypeStruct or Orbax's array metadata
        return {prefix: tuple(tree.shape)}
    return {k: v for name, sub in tree.items() for k, v in _flat_shapes(sub, f"{prefix}/{name}" if prefix else
                                                                          str(name)).items()}


def check_shapes(where: str, found, expected, config_where: str) -> None:
    """Refuse a stored tree (``found``: arrays or Orbax metadata) whose names or shapes differ from ``expected`` (the
    shapes ``config_where`` gives): an edited config would otherwise read or export the wrong weights."""
    have, want = _flat_shapes(found), _flat_shapes(expected)
    problems = [f"{k} is missing" for k in want if k not in have]
    problems += [f"{k} is not in the model it describes" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, the config gives {want[k]}" for k in want if k in have
                 and have[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{where}: the stored weights do not match {config_where}: {'; '.join(problems[:3])}{more}; "
                        "was the config edited? restore it, or convert the model again")


def restore_tree(path: str, target=None, expected=None, config_where: str = ""):
    """Restore an Orbax tree saved on any mesh; without ``target`` it lands on this host's first device. With
    ``expected`` (a tree of shapes) a stored tree of other names or shapes is refused before it is read."""
    import jax
    import orbax.checkpoint as ocp

    from absl import logging as absl_logging

    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns about optional metadata files on every read
    try:
        if target is None:
            meta = ckptr.metadata(path)
            meta = getattr(meta, "item_metadata", meta)
            if expected is not None:
                check_shapes(path, meta, expected, config_where)
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), meta)
            nbytes = sum(math.prod(m.shape) * jax.numpy.dtype(m.dtype).itemsize for m in jax.tree.leaves(target))
            if nbytes > LEAFWISE_BYTES:
                plain = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                                     getattr(meta, "tree", meta))
                return _restore_leafwise(path, plain)
        return ckptr.restore(path, target)
    except FileNotFoundError as e:
        raise UserError(f"{path}: checkpoint missing or incomplete ({e})") from None
    except Exception as e:
        raise unreadable(path, e) from None
    finally:
        absl_logging.set_verbosity(verbosity)
        ckptr.close()


def _restore_leafwise(path: str, target: dict) -> dict:
    """Restore a tree of abstract arrays one leaf at a time (the others Orbax placeholders): Orbax's whole-tree
    restore holds ~1.6 copies of a big model at its peak, one leaf at a time ~1 copy and one leaf."""
    import jax
    import orbax.checkpoint as ocp

    leaves, treedef = jax.tree.flatten(target)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        out = []
        for i, leaf in enumerate(leaves):
            item = treedef.unflatten([leaf if j == i else ocp.PLACEHOLDER for j in range(len(leaves))])
            args = jax.tree.map(lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(sharding=x.sharding),
                                item)
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
            out.append(next(x for x in jax.tree.leaves(restored) if x is not ocp.PLACEHOLDER))
        return treedef.unflatten(out)
    finally:
        ckptr.close()


def unreadable(where: str, e: Exception, hint: str = "") -> UserError:
    """The one-line error for a checkpoint Orbax / TensorStore could not read (they raise plain Exceptions on torn
    or damaged files); a ``UserError`` is passed on as it is."""
    if isinstance(e, UserError):
        return e
    text = str(e).strip().split(" See full TensorStore details")[0].splitlines()
    reason = f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
    return UserError(f"{where}: corrupt or unreadable checkpoint ({reason}){hint}")


def load_params(path: str, target: dict | None = None, expected=None, config_where: str = "") -> dict:
    """Restore the params tree; ``target`` (abstract arrays with shardings) places it on a mesh; ``expected`` (shapes)
    is checked first (see ``restore_tree``)."""
    return restore_tree(os.path.join(path, "params"), target, expected, config_where)


def load_lora(path: str, expected=None, config_where: str = "") -> dict:
    """Restore the ``lora/`` tree of a checkpoint whose ``cancerllm.json`` has ``lora``."""
    return restore_tree(os.path.join(path, "lora"), None, expected, config_where)
