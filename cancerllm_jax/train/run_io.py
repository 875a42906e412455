"""A training run's folder (``WORKDIR``): reading back its resolved config and latest checkpoint, atomic writes, and
the lock that keeps a second command out of a folder in use."""
from __future__ import annotations

import dataclasses
import json
import os

from cancerllm_jax.errors import UserError

RUN_FILE = "run.json"
FORMAT = "cancerllm-jax/run-v1"


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def write_text_atomic(path: str, text: str) -> None:
    """``path`` appears complete or not at all: written to a temp name beside it, synced, then renamed."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive lock on ``folder`` (``flock`` on ``folder/.lock``, released when the process ends, even by a
    kill) so that two commands never write one output folder at once; a second one is refused at once, naming
    the process that holds it. ``what`` names the folder in that error (``--out``, ``--workdir``). The lock file
    is removed on exit. ``name``: the lock file's name and the path the error names (one output file of a folder
    that others share), instead of the folder's ``.lock``."""

    def __init__(self, folder: str, what: str, name: str = LOCK_FILE, target: str | None = None):
        self.path, self.what, self.file = os.path.join(folder, name), what, None
        self.target = target or folder

    def __enter__(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            return self
        while True:
            f = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another process
                f.seek(0)
                holder = f.read().strip()
                f.close()
                raise UserError(f"{self.what} {self.target} is in use by another command"
                                f"{f' (process {holder})' if holder else ''}: wait for it to end, or use another "
                                f"{self.what}") from None
            except OSError:  # a filesystem without locks (some network or FUSE mounts): run unguarded, as before
                f.close()
                try:
                    os.remove(self.path)
                except OSError:
                    pass
                return self
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.truncate(0)
        f.write(f"{os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            try:
                os.remove(self.path)  # while still held: a waiting locker then sees another file and retries
            except OSError:
                pass
            self.file.close()
            self.file = None


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def read_run_meta(path: str) -> dict:
    from cancerllm_jax.checkpoint.orbax_io import read_format_json

    return read_format_json(path, RUN_FILE, FORMAT)


def latest_step(ckpt_dir: str) -> int | None:
    """The newest COMPLETE checkpoint step (Orbax finalises a step by renaming its temp folder)."""
    if not os.path.isdir(ckpt_dir):
        return None
    numbered = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n))]
    steps = [n for n in numbered if os.path.isdir(os.path.join(ckpt_dir, str(n), "state"))]
    latest = max(steps) if steps else None
    broken = sorted(n for n in numbered if n not in steps and (latest is None or n > latest))
    if broken:  # Orbax counts the folder as a saved step: a resume would collide with it, a load skip it silently
        back = f"go back to step {latest}" if latest is not None else "start the run again"
        raise UserError(f"{ckpt_dir}/{broken[-1]}: incomplete checkpoint (no state/ folder); remove the whole folder "
                        f"{ckpt_dir}/{broken[-1]} to {back}")
    return latest


def run_tokenizer(meta: dict) -> str:
    """The tokenizer spec a run (its ``run.json`` dict) was trained with."""
    return ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or meta.get("tokenizer") or "mistral-v1"


def weights_digest(params: dict, samples: int = 4096) -> str:
    """A content fingerprint of base weights, cheap at 7B: every tensor's path, shape, dtype and ``samples`` values
    spread evenly over it (all of a small tensor). ``--resume`` and loading a run (:func:`read_run_weights`) compare
    it, so a base whose weights changed in place is refused however the files were copied (their dates are not
    looked at)."""
    import hashlib

    import jax
    import numpy as np

    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:  # dict keys in sorted order
        flat = np.asarray(x).reshape(-1)
        picked = flat if flat.size <= samples else flat[np.linspace(0, flat.size - 1, samples).astype(np.int64)]
        h.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|".encode())
        h.update(np.ascontiguousarray(picked).tobytes())
    return h.hexdigest()[:16]


def read_run_weights(path: str):
    """``LoadedWeights`` of a run's latest checkpoint: base + LoRA factors, or all weights for ``--full``."""
    from cancerllm_jax.api import LoadedWeights, read_weights
    from cancerllm_jax.config import LoRAConfig, ModelConfig, build
    from cancerllm_jax.checkpoint.orbax_io import check_shapes, load_params, restore_tree
    from cancerllm_jax.model import param_shapes

    meta = read_run_meta(path)
    step = latest_step(os.path.join(path, "checkpoints"))
    if step is None:
        raise UserError(f"{path}: the run has no finished checkpoint yet")
    cfg = build(ModelConfig, meta["model"], f"{path}/{RUN_FILE}:model")
    try:
        state = restore_tree(os.path.join(path, "checkpoints", str(step), "state"))
    except UserError as e:
        raise UserError(f"{e}; restore it, or remove the whole folder {path}/checkpoints/{step} to load the "
                        "checkpoint before it") from None
    trainable = state["params"]
    run_cfg = meta["config"]
    tok = run_tokenizer(meta)
    where = f"{path}/{RUN_FILE}"
    lora = None if run_cfg.get("full") else build(LoRAConfig, run_cfg["lora"], f"{where}:config.lora")
    base_shapes, lora_shapes = param_shapes(cfg, lora)
    check_shapes(f"{path}/checkpoints/{step}/state", trainable, lora_shapes if lora else base_shapes,
                 f"{where}:config.lora" if lora else f"{where}:model")
    if lora is None:
        return LoadedWeights(cfg, trainable, tokenizer_spec=tok, source=path)
    base = meta["base"]
    if base["kind"] == "saved":
        params = load_params(os.path.join(path, base["path"]), None, base_shapes, f"{where}:model")
    elif base["kind"] == "path":
        if not os.path.exists(base["path"]):  # the run keeps only what it trained; the base is read from there
            raise UserError(f"{path}: the base model it was trained on, {base['path']} ({RUN_FILE}: base.path), is "
                            "not found; put that model back there (the run holds only the weights it trained)")
        w = read_weights(base["path"])
        params = w.params
        check_shapes(base["path"], params, base_shapes, f"{where}:model")
        if "eos_token_ids" not in meta["model"]:  # a run of an older version recorded only the first EOS id
            cfg = dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + w.cfg.eos_token_ids)
        if w.lora is not None and w.lora_params is not None:
            from cancerllm_jax.model.lora import merge_lora_params

            params = merge_lora_params(params, w.lora_params, w.lora)
        was, now = base.get("weights_digest"), weights_digest(params)
        if was and was != now:  # as --resume refuses it: the trained factors would apply to another model
            raise UserError(f"{path}: its base model {base['path']} ({RUN_FILE}: base.path) has other weights than "
                            f"the run trained on (weights digest {now}, was {was}): its LoRA would apply to another "
                            "model; put the original weights back there")
    else:
        from cancerllm_jax.model import base_params, create_model

        # made as the run made it: with its LoRA factors, which draw from the same seeded stream as the weights
        params = base_params(create_model(cfg, lora, meta.get("dtype", "float32"), seed=base.get("seed", 0)))
    return LoadedWeights(cfg, params, lora=lora, lora_params=trainable, tokenizer_spec=tok, source=path)
