"""The front door: ``load(path)`` → ``LM`` with ``.logits(ids)``, ``.generate(prompts, ...)`` and ``.tokenizer``."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cancerllm_jax.config import PRESETS, LoRAConfig, ModelConfig, generation_settings_to_name, hf_eos_ids
from cancerllm_jax.errors import UserError, refuse_unknown_arguments  # noqa: F401  (imported from here too)

log = logging.getLogger(__name__)


@dataclass
class LoadedWeights:
    cfg: ModelConfig
    params: dict
    lora: LoRAConfig | None = None
    lora_params: dict | None = None
    tokenizer_spec: str | None = None
    source: str = ""


def model_kind(path: str) -> tuple[str, str]:
    """``(absolute path, kind)``: kind ``checkpoint`` (converted), ``run`` (a training run) or ``hf`` (an HF
    folder); anything else is an error naming the path."""
    from cancerllm_jax.checkpoint import orbax_io
    from cancerllm_jax.train import run_io

    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"model path: expected a folder name, got {path!r}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"model path not found: {path}")
    if not os.path.isdir(path):
        raise UserError(f"{path}: expected a folder (HF model folder, converted checkpoint or training run)")
    if orbax_io.is_params_checkpoint(path):
        return path, "checkpoint"
    if run_io.is_run_dir(path):
        return path, "run"
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, "hf"
    hint = ""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        hint = ("; it is a PEFT adapter: give its base model as the path and this folder as adapter= (on the "
                "command line: --model BASE --adapter DIR)")
    elif (run := next((p for p in (os.path.dirname(path), os.path.dirname(os.path.dirname(path)))
                       if run_io.is_run_dir(p)), None)):
        hint = f"; it is inside the training run {run}: give the run folder (its latest checkpoint)"
    raise UserError(f"{path}: not an HF model folder (no config.json), a converted checkpoint "
                    f"(no {orbax_io.META_FILE}) or a training run (no {run_io.RUN_FILE}){hint}")


def read_model_config(path: str) -> ModelConfig:
    """The model config of any location ``read_weights`` reads, without reading the weights."""
    from cancerllm_jax.checkpoint import orbax_io
    from cancerllm_jax.config import build, read_hf_config
    from cancerllm_jax.train import run_io

    path, kind = model_kind(path)
    if kind == "hf":
        return read_hf_config(path)
    meta, name = ((orbax_io.read_meta(path), orbax_io.META_FILE) if kind == "checkpoint"
                  else (run_io.read_run_meta(path), run_io.RUN_FILE))
    return build(ModelConfig, meta["model"], f"{path}/{name}:model")


def read_tokenizer_spec(path: str) -> str | None:
    """The tokenizer spec ``read_weights(path)`` gives, without reading the weights."""
    from cancerllm_jax.train import run_io

    path, kind = model_kind(path)
    return run_io.run_tokenizer(run_io.read_run_meta(path)) if kind == "run" else _tokenizer_in(path)


def check_readable(path: str) -> None:
    """What ``read_weights(path)`` would refuse before reading any weight: a training run without a finished
    checkpoint (for ``--dry-run``, which reads none)."""
    from cancerllm_jax.train import run_io

    path, kind = model_kind(path)
    if kind == "run" and run_io.latest_step(os.path.join(path, "checkpoints")) is None:
        raise UserError(f"{path}: the run has no finished checkpoint yet")


NO_ADAPTER = "none"  # the CLI value for "this model has no adapter"


def adapter_or_none(value: str | None) -> str | None:
    """A CLI ``--adapter`` value: None for absent, empty or ``none`` (any case), else the folder as given."""
    return None if value in (None, "") or value.lower() == NO_ADAPTER else value


def check_adapter(adapter: str, base: str) -> str:
    """The PEFT ``adapter`` folder's absolute path, once its config and tensors are checked against the model
    config at ``base`` (no weights read): for commands that must fail before any work starts."""
    from cancerllm_jax.checkpoint.peft import check_adapter_folder, read_peft_adapter

    adapter = os.path.abspath(os.path.expanduser(adapter))
    check_adapter_folder(adapter)
    read_peft_adapter(adapter, read_model_config(base))
    return adapter


def read_weights(path: str, dtype: str | None = None) -> LoadedWeights:
    """Read any supported location: HF folder, converted checkpoint (with its unmerged LoRA, if any), or a training
    run (latest checkpoint)."""
    from cancerllm_jax.checkpoint import orbax_io

    if isinstance(path, str) and path in PRESETS and not os.path.exists(os.path.expanduser(path)):
        return preset_weights(path)
    path, kind = model_kind(path)
    if kind == "checkpoint":
        meta = orbax_io.read_meta(path)
        from cancerllm_jax.config import build

        from cancerllm_jax.model import param_shapes

        where = f"{path}/{orbax_io.META_FILE}"
        cfg = build(ModelConfig, meta["model"], f"{where}:model")
        lora = build(LoRAConfig, meta["lora"], f"{where}:lora") if "lora" in meta else None
        base_shapes, lora_shapes = param_shapes(cfg, lora)
        return LoadedWeights(cfg, orbax_io.load_params(path, None, base_shapes, f"{where}:model"), lora=lora,
                             lora_params=orbax_io.load_lora(path, lora_shapes, f"{where}:lora") if lora else None,
                             tokenizer_spec=_tokenizer_in(path), source=path)
    if kind == "run":
        from cancerllm_jax.train import run_io

        return run_io.read_run_weights(path)
    from cancerllm_jax.checkpoint.hf import read_hf

    cfg, params = read_hf(path)
    return LoadedWeights(cfg, params, tokenizer_spec=_tokenizer_in(path), source=path)


def preset_weights(name: str) -> LoadedWeights:
    """A preset's random weights (seed 0, float32) with the Mistral v1 tokenizer, for smoke runs without a model
    folder (``cj.load("tiny")``, ``robustness.py misspell --model tiny``). A folder of that name wins; presets of 2e9
    parameters or more (random weights of a 7B model: --dry-run and the benchmarks build them) are refused."""
    from cancerllm_jax.model import base_params, create_model

    cfg = PRESETS[name]
    if cfg.num_params() >= 2e9:
        raise UserError(f"model path not found: {os.path.abspath(name)} ({name} is a preset of random weights, "
                        f"{cfg.num_params() / 1e9:.1f}B parameters: too large to load as a model; give an HF folder)")
    return LoadedWeights(cfg, base_params(create_model(cfg, None, "float32", seed=0)), tokenizer_spec="mistral-v1",
                         source=name)


def with_adapter(w: LoadedWeights, adapter: str, dtype=None) -> LoadedWeights:
    """``w`` with a PEFT adapter folder as its LoRA; a LoRA ``w`` already has (a run's) is merged into the base
    first (cast to ``dtype``, default the stored one). The adapter's shapes are checked against ``w.cfg``."""
    from cancerllm_jax.checkpoint.peft import read_peft_adapter

    params = w.params
    if w.lora is not None and w.lora_params is not None:
        from cancerllm_jax.model.lora import merge_lora_params

        params = merge_lora_params(params, w.lora_params, w.lora, dtype)
    lora, lora_params = read_peft_adapter(os.path.abspath(os.path.expanduser(adapter)), w.cfg)
    return dataclasses.replace(w, params=params, lora=lora, lora_params=lora_params)


def _tokenizer_in(folder: str) -> str | None:
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(folder, name)):
            return folder
    return None


class LM:
    """A loaded model on a mesh. ``logits`` compiles once per batch size and sequence-length bucket; ``generate``
    once per prompt-length bucket, batch and decoding budget (see ``cancerllm_jax.decode``)."""

    def __init__(self, model, cfg: ModelConfig, tokenizer: Any, mesh, source: str = "",
                 eos_ids: tuple[int, ...] | None = None, adapter: str | None = None):
        from cancerllm_jax import sharding

        self.cfg, self.tokenizer, self.mesh, self.source = cfg, tokenizer, mesh, source
        self.adapter = adapter  # the PEFT adapter folder loaded on top of ``source``, if any
        if eos_ids is None:  # generation stops at any of these (the tokenizer's, else the config's)
            eos = own_eos_id(tokenizer, cfg)
            eos_ids = (eos,) if eos is not None and eos >= 0 else ()
        self.eos_ids = tuple(eos_ids)
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)
        shardings = sharding.param_shardings(pure, mesh, cfg, fsdp=False, notice=lambda *_: None)
        pure = jax.device_put(pure, shardings)
        nnx.replace_by_pure_dict(state, pure)
        self.graphdef, self.state = graphdef, state
        self.model = nnx.merge(graphdef, state)
        self._logits_fn = jax.jit(self._logits_impl)
        self._decoder = None

    def _logits_impl(self, state, ids, segments):
        model = nnx.merge(self.graphdef, state)
        logits, _ = model(ids, segment_ids=segments)
        return logits.astype(jnp.float32)

    def logits(self, input_ids, attention_mask=None, **unknown) -> np.ndarray:
        """``int [B, T]`` → ``float32 numpy [B, T, V]`` (a 1-D input gives ``[T, V]``).

        ``attention_mask`` (0/1, the shape of ``input_ids``), as transformers': tokens attend only to earlier tokens
        of mask 1 (left- or right-padded rows give each real token the logits of the row without its padding);
        the logits at mask-0 positions mean nothing. Rows are right-padded to a length bucket (one compile per
        bucket): float32 logits then agree with an exact-length call to the last bits (~1e-6), not bit for bit."""
        refuse_unknown_arguments("logits", unknown, LM.logits, {"mask": " (use attention_mask=)"})
        try:
            ids = np.asarray(input_ids)
        except ValueError:  # ragged rows
            raise UserError("input_ids: expected a non-empty int array [B, T], got rows of different lengths "
                            "(pad them and pass attention_mask)") from None
        squeeze = ids.ndim == 1
        if ids.ndim not in (1, 2) or ids.size == 0:
            raise UserError(f"input_ids: expected a non-empty int array [B, T] (or [T]), got shape {ids.shape}")
        ids = ids[None] if squeeze else ids
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"input_ids: expected integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise UserError(f"input_ids: ids must be in [0, {self.cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
        seg = np.ones(ids.shape, np.int32)
        if attention_mask is not None:
            try:
                mask = np.asarray(attention_mask)
                got = f"{mask.dtype} {mask.shape}"
            except ValueError:
                mask, got = None, "rows of different lengths"
            mask = mask[None] if squeeze and mask is not None and mask.ndim == 1 else mask
            ok = mask is not None and mask.shape == ids.shape and (np.issubdtype(mask.dtype, np.integer)
                                                                   or np.issubdtype(mask.dtype, np.floating)
                                                                   or mask.dtype == bool)  # as transformers
            if not ok or not np.isin(mask, (0, 1)).all():
                raise UserError(f"attention_mask: expected 0/1 values in the shape of input_ids {ids.shape}, got {got}")
            seg = mask.astype(np.int32)
        from cancerllm_jax import sharding

        from cancerllm_jax.decode import bucket_length

        d = self.mesh.shape["data"]
        b, t = ids.shape
        pad = (-b) % d
        x, seg = ((np.concatenate([a, np.full((pad, a.shape[1]), fill, a.dtype)]) if pad else a)
                  for a, fill in ((ids, 0), (seg, 1)))
        # right-padded to the length bucket (one compile per bucket, not per length): causal attention keeps the
        # padding, at the end and of mask 0, out of every real position's logits
        x, seg = (np.pad(a, ((0, 0), (0, bucket_length(t, minimum=1) - t))) for a in (x, seg))
        x, seg = (jax.device_put(jnp.asarray(a, jnp.int32), sharding.batch_sharding(self.mesh)) for a in (x, seg))
        out = np.asarray(self._logits_fn(self.state, x, seg))[:b, :t]
        return out[0] if squeeze else out

    def generate(self, prompts, max_new_tokens: int = 64, **kwargs):
        """Strings → list of strings; token-id lists (or an id array ``[B, T]``) → list of generated id lists
        (prompt excluded).

        See ``cancerllm_jax.decode.Decoder.generate`` for ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``stop``, ``eos_id`` and ``max_prompt_tokens``.
        """
        from cancerllm_jax.decode import Decoder

        refuse_unknown_arguments("generate", kwargs, Decoder.generate,
                                 {"do_sample": " (temperature=0.0 is greedy, > 0 samples)",
                                  "max_length": " (use max_new_tokens=: the tokens generated after the prompt)",
                                  "num_beams": " (beam search is not supported: decoding is greedy or sampled)",
                                  "stop_strings": " (use stop=: strings that end a row's text)"})
        if hasattr(prompts, "__array__"):  # an id array [B, T] (numpy, jax, torch): one prompt per row
            prompts = np.asarray(prompts)
            if prompts.ndim != 2:
                raise UserError(f"prompts: an id array must be 2-D [B, T], one prompt per row, got shape "
                                f"{prompts.shape}" + (" (one prompt: pass [ids] or ids[None])" if prompts.ndim == 1
                                                      else ""))
            prompts = prompts.tolist()
        if self._decoder is None:
            self._decoder = Decoder(self)
        return self._decoder.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)


def load(path: str, dtype: str = "float32", mesh: str = "1x1", merge_lora: bool = True, tokenizer: str | None = None,
         attention: str = "auto", adapter: str | None = None, **unknown) -> LM:
    """Load weights from ``path`` in ``dtype`` onto a ``mesh`` ("DxM"); a run's LoRA is merged by default.

    ``adapter``: a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) to put on the
    base ``path`` (whose own LoRA, if any, is merged first); ``merge_lora`` folds it into the weights (summed in
    float32, kept in ``dtype``: a bf16 base loaded as float32 keeps the exact sum), else it stays a LoRA branch.
    ``attention``: ``auto`` (cuDNN flash attention on a GPU in bf16/fp16, else the explicit-mask einsum), ``xla``
    or ``cudnn``.
    """
    from cancerllm_jax import sharding
    from cancerllm_jax.data.tokenizer import tokenizer_path
    from cancerllm_jax.model import model_from_params, resolve_dtype

    from cancerllm_jax.model.mistral import ATTENTION_IMPLS

    refuse_unknown_arguments("load", unknown, load, {"torch_dtype": " (use dtype=)"})
    resolve_dtype(dtype)
    if not isinstance(merge_lora, (bool, np.bool_)):
        raise UserError(f"merge_lora must be True or False, got {merge_lora!r}")
    if attention not in ATTENTION_IMPLS:
        raise UserError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
    given_tokenizer = None
    if tokenizer is not None:  # read before any weight is: a wrong path fails at once, not after minutes of loading
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tokenizer = tokenizer_path(tokenizer)
        given_tokenizer = load_tokenizer(tokenizer)
    shape = sharding.parse_mesh(mesh)
    sharding.provide_host_devices(shape[0] * shape[1])  # a mesh on a CPU host, while JAX has not started
    mesh_obj = sharding.make_mesh(shape)
    if adapter is not None:
        from cancerllm_jax.checkpoint.peft import check_adapter_folder

        if not isinstance(adapter, (str, os.PathLike)) or not str(adapter).strip():
            raise UserError(f"adapter: expected a PEFT adapter folder, got {adapter!r}")
        adapter = os.path.abspath(os.path.expanduser(adapter))
        check_adapter_folder(adapter)  # a wrong adapter fails before the base is read
    w = read_weights(path)
    if adapter is not None:
        w = with_adapter(w, adapter, dtype)
    if w.lora is not None and w.lora_params is not None and merge_lora:
        from cancerllm_jax.model.lora import merge_lora_params

        params = merge_lora_params(w.params, w.lora_params, w.lora, dtype)  # the sum kept in the loaded dtype
        model = model_from_params(w.cfg, params, dtype=dtype, attention=attention)
    else:
        model = model_from_params(w.cfg, w.params, lora=w.lora if w.lora_params is not None else None,
                                  lora_params=w.lora_params, dtype=dtype, attention=attention)
    tok = tokenizer_for(w.cfg, tokenizer or w.tokenizer_spec, given_tokenizer)
    if tok is not None and not (tokenizer or w.tokenizer_spec):
        log.warning("%s: no tokenizer file beside the weights; using the Mistral-7B v0.1 tokenizer shipped in "
                    "mistral-common (this is a 32,000-token Mistral); pass tokenizer= to use another", path)
    # the config's EOS ids (an HF folder's files, a run's base) and those a converted checkpoint's copied
    # generation_config.json names (checkpoints converted before the config recorded them all)
    eos = {own_eos_id(tok, w.cfg), *w.cfg.eos_token_ids} | hf_eos_ids(path)
    ignored, sampling = generation_settings_to_name(path)
    if ignored:
        log.warning("%s: generation_config.json sets %s, which generate here does not apply (it decodes greedily "
                    "unless given temperature > 0, with top_k / top_p as given): its outputs can differ from "
                    "transformers' generate on this folder", path, ", ".join(ignored))
    if sampling:
        log.warning("%s: generation_config.json sets %s, which transformers' generate uses when it samples; "
                    "generate here uses only the values it is given: pass them to sample alike", path,
                    ", ".join(sampling))
    return LM(model, w.cfg, tok, mesh_obj, source=w.source,
              eos_ids=tuple(sorted(e for e in eos if e is not None and 0 <= e < w.cfg.vocab_size)),
              adapter=adapter)


def tokenizer_for(cfg: ModelConfig, spec: str | None, loaded=None):
    """The tokenizer a model of ``cfg`` is used with: ``spec`` (given, or found beside the weights; ``loaded``: that
    one already read), else the shipped Mistral v1 one for a 32,000-token Mistral; None when there is none. One
    larger than the model's vocabulary is refused."""
    from cancerllm_jax.data.tokenizer import load_tokenizer

    tok = loaded
    if tok is None and spec is not None:
        tok = load_tokenizer(spec)
    elif tok is None and cfg.vocab_size == 32000 and cfg.model_type == "mistral":
        try:
            tok = load_tokenizer(None)
        except UserError:
            tok = None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {getattr(tok, 'name', spec)} has {tok.vocab_size} tokens but the model's "
                        f"vocabulary is {cfg.vocab_size}")
    return tok


def own_eos_id(tokenizer, cfg: ModelConfig) -> int | None:
    """The tokenizer's EOS id, else the model config's."""
    return tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
