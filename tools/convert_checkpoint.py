#!/usr/bin/env python3
"""Convert weights between Hugging Face safetensors folders and our converted-checkpoint format.

    python tools/convert_checkpoint.py from-hf HF_DIR OUT_DIR [--dtype float32|bfloat16] [--overwrite]
                                       [--peft-adapter ADAPTER_DIR [--merge-lora]]
    python tools/convert_checkpoint.py to-hf CKPT_DIR OUT_DIR [--merge-lora | --peft-adapter] [--overwrite]

``from-hf --peft-adapter`` adds a PEFT LoRA adapter made for HF_DIR: kept as separate float32 LoRA factors in the
converted checkpoint (``to-hf --peft-adapter`` gives the same adapter back), or folded into the weights with
``--merge-lora`` (in float32, then cast to ``--dtype``).
``CKPT_DIR`` may be a converted checkpoint, an HF folder or a training run (its latest checkpoint). A run or
checkpoint with LoRA is exported merged unless ``--peft-adapter`` asks for ``adapter_model.safetensors`` +
``adapter_config.json``.
Outputs are written atomically; a non-empty ``OUT_DIR`` is refused without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys

# this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if next((a for a in sys.argv[1:] if not a.startswith("-")), None) == "to-hf":  # the command, after any --debug
    # glibc's own malloc: the package keeps freed host memory for training steps (cancerllm_jax/hostmem.py), which
    # here would keep each restored leaf's and written tensor's temporaries (from-hf reuses the freed host leaves)
    os.environ.setdefault("CANCERLLM_HOST_MALLOC", "system")

from cancerllm_jax import api
from cancerllm_jax.errors import UserError, cli_main

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _cast_in_place(params: dict, dtype: str | None) -> None:
    """Cast every array of a params tree to ``dtype`` (None keeps it: bit-exact), one leaf at a time."""
    if dtype is None:
        return
    import numpy as np

    from cancerllm_jax.checkpoint.hf import _np_dtype
    from cancerllm_jax.checkpoint.orbax_io import replace_leaves_in_place
    from cancerllm_jax.model import check_fits

    def cast(where, a):
        check_fits(f"--dtype {dtype}: weight {where}", a, dtype)
        return np.asarray(a).astype(_np_dtype(dtype), copy=False)

    replace_leaves_in_place(params, cast)


def _dicts_copied(tree: dict) -> dict:
    """``tree``'s nested dicts copied, its arrays shared."""
    return {k: _dicts_copied(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _dtype_name(params: dict) -> str:
    import numpy as np

    return str(np.asarray(params["embed"]).dtype)


def from_hf(hf_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False,
            adapter: str | None = None, merge_lora: bool = False) -> str:
    """HF folder (+ PEFT adapter, unmerged unless ``merge_lora``) → our converted checkpoint (tokenizer files
    copied). Returns ``out_dir``."""
    from cancerllm_jax.checkpoint.hf import read_hf
    from cancerllm_jax.checkpoint.orbax_io import save_params
    from cancerllm_jax.checkpoint.peft import adapter_base_name, check_adapter_folder

    from cancerllm_jax.config import read_json_file

    if adapter is not None:
        adapter = os.path.abspath(os.path.expanduser(adapter))
    _check_out(out_dir, overwrite, hf_dir, *([adapter] if adapter else []))
    if merge_lora and adapter is None:
        raise UserError("--merge-lora needs --peft-adapter (an HF folder has no LoRA to merge)")
    extra: dict = {"source": os.path.abspath(hf_dir)}
    if os.path.isfile(os.path.join(hf_dir, "config.json")):  # its keys the model does not read, for to-hf
        extra["hf_config"] = read_json_file(os.path.join(hf_dir, "config.json"))
    if adapter is not None:
        check_adapter_folder(adapter)  # a wrong adapter fails before the base is read
        extra["adapter"] = {"source": adapter, "base_model_name_or_path": adapter_base_name(adapter)}
    # a merge sums the file's weights and the factors in float32 and rounds once, to ``dtype`` (as peft's merge in
    # float32, then a cast): weights cast before the merge were rounded twice
    cfg, params = read_hf(hf_dir, dtype=None if merge_lora else dtype)
    if cfg.tie_embeddings and _source_stores_tied_head([hf_dir]):  # equal to the embeddings (else read untied)
        extra["hf_stores_tied_head"] = True
    lora = lora_params = None
    if adapter is not None:
        w = api.with_adapter(api.LoadedWeights(cfg, params), adapter)
        lora, lora_params = w.lora, w.lora_params
    if merge_lora:
        from cancerllm_jax.model.lora import merge_lora_params

        merge_lora_params(params, lora_params, lora, dtype, in_place=True)
        _cast_in_place(params, dtype)
        lora = lora_params = None
    save_params(out_dir, cfg, params, dtype=_dtype_name(params), extra=extra, overwrite=overwrite,
                tokenizer_dir=hf_dir, lora=lora, lora_params=lora_params)
    return out_dir


def to_hf(ckpt_dir: str, out_dir: str, mode: str | None = None, overwrite: bool = False,
          dtype: str | None = None, base_name: str | None = None, shard_bytes: int | None = None) -> list[str]:
    """Our checkpoint / HF folder / run → HF folder (``mode`` None or "merge") or PEFT adapter (``mode="peft"``)."""
    from cancerllm_jax.checkpoint.hf import SHARD_BYTES, write_hf

    sources = _source_dirs(ckpt_dir)  # a run reads its base when exported: never replace it either
    _check_out(out_dir, overwrite, *sources)
    w = api.read_weights(ckpt_dir)
    has_lora = w.lora is not None and w.lora_params is not None
    tok_dir = w.tokenizer_spec
    if tok_dir and os.path.exists(tok_dir):  # a run's own --tokenizer is read at export too
        _check_out(out_dir, overwrite, tok_dir)
    if mode == "peft":
        from cancerllm_jax.checkpoint.peft import write_peft_adapter

        if not has_lora:
            raise UserError(f"{ckpt_dir}: has no LoRA factors, so there is no adapter to export "
                            "(use to-hf without --peft-adapter)")
        base = base_name or _base_of(ckpt_dir, w)
        from cancerllm_jax.checkpoint import orbax_io
        from cancerllm_jax.train.run_io import is_run_dir

        if base and not base_name and (orbax_io.is_params_checkpoint(base) or is_run_dir(base)):
            what = "converted checkpoint" if orbax_io.is_params_checkpoint(base) else "training run"
            print(f"note: the adapter's base is the {what} {base}, which peft cannot read (it reads HF folders "
                  f"only); for peft, export it with `python tools/convert_checkpoint.py to-hf {base} BASE_OUT` and "
                  "load the adapter on BASE_OUT (or pass --base-name BASE_OUT)", file=sys.stderr)
        return write_peft_adapter(out_dir, w.cfg, w.lora, w.lora_params, base_name_or_path=base,
                                  overwrite=overwrite, dtype=dtype, tokenizer_dir=tok_dir)
    # dicts of our own: the merged kernels replace the read ones in them one by one, so the read ones are freed
    params, cfg, lora, lora_params = _dicts_copied(w.params), w.cfg, w.lora, w.lora_params
    del w
    if has_lora:
        from cancerllm_jax.model.lora import merge_lora_params

        merge_lora_params(params, lora_params, lora, dtype, in_place=True)  # the float32 sum, rounded once
    gen = next((f for d in sources if os.path.isfile(f := os.path.join(d, "generation_config.json"))),
               None)  # its sampling settings, where no tokenizer folder brings them
    return write_hf(out_dir, cfg, params, overwrite=overwrite, tokenizer_dir=tok_dir,
                    shard_bytes=shard_bytes or SHARD_BYTES, generation_config=gen,
                    source_config=_source_hf_config(sources), dtype=dtype,
                    tied_head=_source_stores_tied_head(sources))


def _source_hf_config(sources: list[str]) -> dict | None:
    """The config.json the weights came from (``sources`` as ``_source_dirs`` gives them): an HF folder's own, the
    one a converted checkpoint recorded, or a run's base's (None when there is none: a preset)."""
    from cancerllm_jax.checkpoint import orbax_io
    from cancerllm_jax.config import read_json_file

    for d in sources:
        if orbax_io.is_params_checkpoint(d):
            return orbax_io.read_meta(d).get("hf_config")
        if os.path.isfile(os.path.join(d, "config.json")):
            return read_json_file(os.path.join(d, "config.json"))
    return None


def _source_stores_tied_head(sources: list[str]) -> bool:
    """Whether the HF folder the weights came from stored ``lm_head.weight`` beside tied embeddings (some saves do;
    transformers' own leaves it out): the export then stores it too, so HF → ours → HF gives its tensors back."""
    from cancerllm_jax.checkpoint import orbax_io
    from cancerllm_jax.checkpoint.hf import safetensors_files

    for d in sources:
        if orbax_io.is_params_checkpoint(d):
            return bool(orbax_io.read_meta(d).get("hf_stores_tied_head"))
        if os.path.isfile(os.path.join(d, "config.json")):
            try:
                return "lm_head.weight" in safetensors_files(d)
            except UserError:
                return False
    return False


def _source_dirs(ckpt_dir: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The folder ``to-hf`` reads, then (a run whose base is a folder) the base it reads too, and so on down a run
    tuned on a run: the last one is the model whose config.json and generation settings the export keeps."""
    from cancerllm_jax.train import run_io

    path = os.path.abspath(os.path.expanduser(ckpt_dir))
    if not run_io.is_run_dir(path) or path in seen:
        return [path]
    base = run_io.read_run_meta(path).get("base") or {}
    if base.get("kind") != "path" or not base.get("path"):
        return [path]
    return [path] + _source_dirs(base["path"], (*seen, path))


def _base_of(ckpt_dir: str, w) -> str | None:
    """The base model a run was tuned from, as its ``run.json`` records it, or a converted checkpoint's adapter was
    made for (None when unknown)."""
    from cancerllm_jax.checkpoint import orbax_io
    from cancerllm_jax.train import run_io

    path = os.path.abspath(os.path.expanduser(ckpt_dir))
    if orbax_io.is_params_checkpoint(path):
        meta = orbax_io.read_meta(path)
        return (meta.get("adapter") or {}).get("base_model_name_or_path") or meta.get("source")
    if not run_io.is_run_dir(path):
        return getattr(w, "base", None)
    base = run_io.read_run_meta(path).get("base") or {}
    if base.get("kind") == "saved":  # a preset's random weights, saved in the run (a converted checkpoint)
        return os.path.join(path, base.get("path") or "base")
    return base.get("path") if base.get("kind") == "path" else base.get("name")


def _check_out(out_dir: str, overwrite: bool, *sources: str) -> None:
    """Fail before any work when ``out_dir`` is non-empty (without --overwrite), or is one of the ``sources`` the
    command reads or holds one."""
    from cancerllm_jax.checkpoint.orbax_io import refuse_enclosing_folder
    from cancerllm_jax.errors import check_can_write

    refuse_enclosing_folder(out_dir)
    out = os.path.realpath(os.path.expanduser(out_dir))  # real paths: a link must not reach into the input
    for src in (os.path.realpath(os.path.expanduser(s)) for s in sources):
        if os.path.exists(out) and os.path.commonpath([out, src]) == out:  # --overwrite would delete the source
            what = "the input folder" if src == out else f"a folder that holds the input {src}"
            raise UserError(f"{out_dir}: the output folder must not be {what}")
        if overwrite and os.path.isdir(out) and os.listdir(out) and os.path.commonpath([out, src]) == src:
            # replacing a folder inside the input (a checkpoint's params/, a run's checkpoints/) would damage it
            raise UserError(f"{out_dir}: --overwrite would replace a folder inside the input {src}; write to a new "
                            "folder, or delete this one first if it is an earlier export")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_can_write(out_dir, out_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF safetensors folder -> our converted checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: keep the file's)")
    a.add_argument("--peft-adapter", metavar="ADAPTER_DIR", default=None,
                   help="a PEFT LoRA adapter for HF_DIR (adapter_config.json + adapter_model.safetensors), kept as "
                        "separate float32 LoRA factors (to-hf --peft-adapter exports it again)")
    a.add_argument("--merge-lora", action="store_true",
                   help="fold the --peft-adapter into the weights (in float32, then cast to --dtype)")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    b = sub.add_parser("to-hf", help="converted checkpoint / HF folder / training run -> HF folder or PEFT adapter")
    b.add_argument("ckpt_dir")
    b.add_argument("out_dir")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--merge-lora", action="store_true", help="fold LoRA into the weights (default for a run)")
    mode.add_argument("--peft-adapter", action="store_true", help="write a PEFT adapter instead of full weights")
    b.add_argument("--base-name", default=None, help="adapter_config base_model_name_or_path (default: the run's)")
    b.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: keep stored dtype)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "from-hf":
        from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, adapter=args.peft_adapter,
                merge_lora=args.merge_lora)
        lora = "" if not args.peft_adapter else (" (adapter merged)" if args.merge_lora else " (with LoRA adapter)")
        print(f"wrote converted checkpoint {os.path.abspath(args.out_dir)}{lora}")
        return 0
    mode = "peft" if args.peft_adapter else ("merge" if args.merge_lora else None)
    files = to_hf(args.ckpt_dir, args.out_dir, mode=mode, overwrite=args.overwrite, dtype=args.dtype,
                  base_name=args.base_name)
    what = "PEFT adapter" if mode == "peft" else "HF model"
    print(f"wrote {what} {os.path.abspath(args.out_dir)}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
