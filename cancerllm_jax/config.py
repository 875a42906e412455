"""Typed configs: the model, LoRA, data, training and mesh settings; YAML files and ``key=value`` overrides.

Every config is a frozen dataclass; unknown keys are errors that suggest the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from cancerllm_jax.errors import UserError, suggest


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape. ``sliding_window=None`` means full causal attention (Llama)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 4096
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "mistral"
    eos_token_ids: tuple[int, ...] = ()  # every EOS id the HF files name (generation stops at any); eos_token_id first
    # RoPE frequency scaling as transformers' ``rope_parameters``: "default" (none), "linear" (every frequency
    # divided by ``rope_factor``) or "llama3" (Llama 3.1: low frequencies divided, high kept, a smooth ramp between,
    # set by the low/high frequency factors and the original context length).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192

    def __post_init__(self):
        first = () if self.eos_token_id is None else (int(self.eos_token_id),)
        object.__setattr__(self, "eos_token_ids", tuple(dict.fromkeys(first + tuple(int(e) for e in
                                                                                     self.eos_token_ids))))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:  # RoPE rotates halves of each head (transformers refuses it too)
            raise UserError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model config: num_heads {self.num_heads} is not a multiple of "
                            f"num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UserError(f"model config: sliding_window must be positive or null, got {self.sliding_window}")
        if self.model_type not in ("mistral", "llama"):
            raise UserError(f"model config: model_type must be 'mistral' or 'llama', got {self.model_type!r}")
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"model config: rope_type {self.rope_type!r} is not supported (supported: "
                            f"{list(ROPE_TYPES)})")
        if not 0.0 < self.rope_factor < float("inf"):
            raise UserError(f"model config: rope_factor must be positive, got {self.rope_factor}")
        if self.rope_type == "llama3" and not (0.0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                                               and self.rope_original_max_position_embeddings > 0):
            raise UserError("model config: llama3 RoPE needs 0 < rope_low_freq_factor < rope_high_freq_factor and a "
                            f"positive rope_original_max_position_embeddings (got {self.rope_low_freq_factor}, "
                            f"{self.rope_high_freq_factor}, {self.rope_original_max_position_embeddings})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count of the base model (embeddings counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d


ROPE_TYPES = ("default", "linear", "llama3")
# transformers' rope_parameters keys -> ModelConfig fields, per rope type (each key is required, as in transformers)
ROPE_KEYS = {"default": {}, "linear": {"factor": "rope_factor"},
             "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                        "high_freq_factor": "rope_high_freq_factor",
                        "original_max_position_embeddings": "rope_original_max_position_embeddings"}}


PRESETS: dict[str, ModelConfig] = {
    # Mistral-7B v0.1, the base the CancerLLM paper starts from.
    "mistral-7b-v0.1": ModelConfig(),
    # A few-hundred-thousand-parameter model with the Mistral v1 vocabulary: CPU smoke runs and tests.
    "tiny": ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, sliding_window=128, max_position_embeddings=4096,
                        tie_embeddings=True),
}


def proj_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``[in, out]`` of each projection of one layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"q": (d, cfg.q_size), "k": (d, cfg.kv_size), "v": (d, cfg.kv_size), "o": (cfg.q_size, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}{suggest(name, PRESETS)}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


SUPPORTED_HF_TYPES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}


# transformers' MistralConfig / LlamaConfig defaults for keys a config.json leaves out. An explicit null means no
# sliding window, num_key_value_heads = num_attention_heads, head_dim = hidden_size / num_attention_heads. The five
# shape keys are required (transformers would quietly take Mistral-7B's).
HF_DEFAULTS = {
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 4096 * 32},
    "llama": {"num_key_value_heads": None, "sliding_window": None, "max_position_embeddings": 2048},
}
HF_COMMON_DEFAULTS = {"head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1,
                      "eos_token_id": 2, "pad_token_id": None, "hidden_act": "silu"}


def eos_list(value, source: str = "config.json") -> list[int]:
    """An HF ``eos_token_id`` (an int, a list of ints or null) as a list; anything else is an error naming
    ``source`` (a string or a float id was ignored: generation did not stop where transformers' does)."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, (int, float))
           or isinstance(v, float) and not v.is_integer()]  # 2.5, NaN, Infinity
    if bad:
        raise UserError(f"{source}: eos_token_id must be a token id or a list of them, got {json.dumps(value)}")
    return [int(v) for v in items]


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an HF ``config.json`` dict, resolving every key as transformers' MistralConfig /
    LlamaConfig does (their defaults; ``rope_scaling`` over ``rope_parameters`` over top-level ``rope_theta``;
    Mistral ignores ``use_sliding_window``, ``attention_bias`` and ``mlp_bias``)."""
    mtype = hf.get("model_type")
    if not isinstance(mtype, str) or mtype not in SUPPORTED_HF_TYPES:
        raise UserError(f"{source}: model_type {mtype!r} is not supported (supported: {sorted(SUPPORTED_HF_TYPES)})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise UserError(f"{source}: missing field(s) {missing}")
    hf = {**HF_COMMON_DEFAULTS, **HF_DEFAULTS[mtype], **hf}
    act = hf["hidden_act"]
    if act not in ("silu", "swish"):
        raise UserError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if mtype == "llama" and hf.get(flag):
            raise UserError(f"{source}: {flag}=true is not supported")
    if hf.get("auto_map"):  # transformers without trust_remote_code does the same: the library's own class
        logging.getLogger(__name__).warning(
            "%s: auto_map names custom model code; it is never run here: the weights are read as a standard %s "
            "model (as transformers reads them without trust_remote_code), and an export does not name that code",
            source, mtype)
    dropout = hf.get("attention_dropout")
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and dropout > 0:
        logging.getLogger(__name__).warning(
            "%s: attention_dropout %s is not applied: training here never drops attention probabilities "
            "(transformers does in train mode); inference is unaffected", source, dropout)
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{source}: rope_scaling / rope_parameters must be an object, got {type(rope).__name__}")
    nested = sorted(k for k, v in rope.items() if isinstance(v, dict))
    if nested:  # transformers either fails on these (Ministral) or ignores them and runs the default RoPE
        raise UserError(f"{source}: rope_scaling / rope_parameters per layer type ({nested}) are not supported; "
                        "give one RoPE for every layer (rope_type, rope_theta, ... at its top level)")
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{source}: rope_type {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{source}: partial_rotary_factor {partial!r} is not supported (RoPE on the whole head only)")
    if rope_type == "llama3":  # as transformers' standardize_rope_params: a top-level value first, then the dict's,
        # then the model's context length
        rope = {**rope, "original_max_position_embeddings": hf.get(
            "original_max_position_embeddings", rope.get("original_max_position_embeddings",
                                                         hf.get("max_position_embeddings")))}
    missing = [k for k in ROPE_KEYS[rope_type] if rope.get(k) is None]
    if missing:
        raise UserError(f"{source}: rope_type {rope_type!r} needs rope_scaling / rope_parameters field(s) {missing}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    window = hf["sliding_window"] if mtype == "mistral" else None
    if mtype == "llama" and hf.get("sliding_window") is not None:  # LlamaModel ignores it; generate() does not
        logging.getLogger(__name__).warning(
            "%s: a llama config with sliding_window %s: ignored, as transformers' Llama model ignores it (full "
            "attention; transformers' generate() then builds a sliding cache and can differ from its own forward)",
            source, hf.get("sliding_window"))
    if hf.get("is_causal") is False:  # transformers then attends both ways
        raise UserError(f"{source}: is_causal=false (bidirectional attention) is not supported")
    if hf.get("attention_chunk_size") is not None:  # transformers then attends within chunks only
        raise UserError(f"{source}: attention_chunk_size {json.dumps(hf['attention_chunk_size'])} (chunked "
                        "attention) is not supported")
    layer_types = hf.get("layer_types")
    if mtype == "mistral" and layer_types is not None:  # transformers loads such a config as Ministral
        kinds = set(layer_types) if isinstance(layer_types, list) else {None}
        if kinds == {"full_attention"}:
            window = None
        elif kinds != {"sliding_attention"}:
            raise UserError(f"{source}: layer_types {layer_types!r}: a window on some layers only (Ministral) is not "
                            "supported; every layer must be 'sliding_attention' or every one 'full_attention'")

    def _tok(name):
        v = hf[name]
        if isinstance(v, list):
            return _int(f"{name}[0]", v[0]) if v else None
        return _int(name, v) if v is not None else None

    def _int(name, v):  # as transformers' strict config: "4096", 1.5 and true are no sizes
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v != int(v):
            raise UserError(f"{source}: {name} must be an integer, got {json.dumps(v)}")
        return int(v)

    def _float(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{source}: {name} must be a finite number, got {json.dumps(v)}")
        return float(v)

    def _bool(name, v):
        if not isinstance(v, bool):  # bool("false") is True
            raise UserError(f"{source}: {name} must be true or false, got {json.dumps(v)}")
        return v

    kv = hf["num_key_value_heads"] if hf["num_key_value_heads"] is not None else heads
    n_heads = _int("num_attention_heads", heads)
    if n_heads <= 0:
        raise UserError(f"{source}: num_attention_heads must be positive, got {n_heads}")
    fields = dict(
        vocab_size=_int("vocab_size", hf["vocab_size"]), hidden_size=_int("hidden_size", hf["hidden_size"]),
        intermediate_size=_int("intermediate_size", hf["intermediate_size"]),
        num_layers=_int("num_hidden_layers", hf["num_hidden_layers"]), num_heads=n_heads,
        num_kv_heads=_int("num_key_value_heads", kv),
        head_dim=(_int("head_dim", hf["head_dim"]) if hf["head_dim"] is not None
                  else _int("hidden_size", hf["hidden_size"]) // n_heads),
        rope_theta=_float("rope_theta", theta), rms_norm_eps=_float("rms_norm_eps", hf["rms_norm_eps"]),
        sliding_window=_int("sliding_window", window) if window is not None else None,
        tie_embeddings=_bool("tie_word_embeddings", hf["tie_word_embeddings"]),
        max_position_embeddings=_int("max_position_embeddings", hf["max_position_embeddings"]),
        bos_token_id=_tok("bos_token_id"), eos_token_id=_tok("eos_token_id"), pad_token_id=_tok("pad_token_id"),
        model_type=mtype, eos_token_ids=tuple(eos_list(hf["eos_token_id"], source)), rope_type=rope_type,
        **{f: (_int(k, rope[k]) if f.endswith("embeddings") else _float(k, rope[k]))
           for k, f in ROPE_KEYS[rope_type].items()})
    try:
        return ModelConfig(**fields)
    except UserError as e:  # its own checks: positive sizes, heads a multiple of kv heads, ...
        raise UserError(f"{source}: {e}") from None


def read_hf_config(folder: str) -> ModelConfig:
    """``config.json`` of an HF folder, with every EOS id of its ``generation_config.json`` added."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    hf = read_json_file(path)
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object")
    cfg = from_hf_config(hf, source=path)
    return dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + tuple(sorted(hf_eos_ids(folder))))


def read_json_file(path: str):
    """A Hugging Face JSON file's value (a key given twice: the last one, as transformers reads it); unreadable or
    invalid JSON (bad UTF-8, nested too deeply) is one error naming the file and line."""
    from cancerllm_jax.data.sources import load_json_file

    return load_json_file(path, "not valid JSON", unique_keys=False)


def hf_eos_ids(folder: str) -> set[int]:
    """Every EOS id an HF folder's ``config.json`` / ``generation_config.json`` names (transformers' generate
    stops at any of them, e.g. Llama-3's end-of-text and end-of-turn)."""
    out: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        data = read_json_file(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        out.update(eos_list(data.get("eos_token_id"), path))
    return out


# generation_config.json settings that change which tokens transformers' generate picks, with their neutral values.
# generate here applies none of them (its sampling comes from its own arguments, greedy by default): a folder that
# sets one is named in a warning at load, since its outputs will differ from transformers' generate(ids)
GENERATION_SETTINGS_NOT_APPLIED = {
    "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": 0, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "num_beams": 1, "penalty_alpha": None,
    "exponential_decay_length_penalty": None, "guidance_scale": 1.0, "dola_layers": None, "stop_strings": None,
    "token_healing": False, "watermarking_config": None, "force_words_ids": None, "constraints": None,
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
}
# sampling settings transformers' generate takes from generation_config.json when it samples (its defaults here);
# generate here takes only the values it is given
GENERATION_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def generation_settings_to_name(folder: str) -> tuple[list[str], list[str]]:
    """``key=value`` lists of ``folder``'s ``generation_config.json`` ([] and [] without the file): the settings that
    change transformers' generate and that generate here does not apply (``GENERATION_SETTINGS_NOT_APPLIED``), and
    the sampling settings it sets to other than transformers' defaults (``GENERATION_SAMPLING_DEFAULTS``)."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return [], []
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    not_applied = [f"{k}={json.dumps(data[k])}" for k, neutral in GENERATION_SETTINGS_NOT_APPLIED.items()
                   if data.get(k) is not None and data[k] != neutral and data[k] not in ([], {})]
    sampling = [f"{k}={json.dumps(data[k])}" for k, default in GENERATION_SAMPLING_DEFAULTS.items()
                if data.get(k) is not None and data[k] != default]
    return not_applied, sampling


def hf_eos_value(cfg: ModelConfig):
    """``eos_token_id`` as transformers writes it: the id, or the list when there are several."""
    if len(cfg.eos_token_ids) > 1:
        return list(cfg.eos_token_ids)
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else cfg.eos_token_id


# config.json keys the model does not read, kept from the source's config.json on export (training settings and
# bookkeeping: a user who fine-tunes the export with transformers gets the source's attention dropout back; label
# names). Any other key is dropped, with a note naming it: transformers reads many keys generically (is_causal,
# attention_chunk_size, ...) that would make the export compute something other than the model here.
CARRIED_HF_KEYS = ("attention_dropout", "initializer_range", "use_cache", "pretraining_tp", "id2label", "label2id",
                   "problem_type", "task_specific_params", "unk_token_id", "sep_token_id")
# keys the export writes in its own form, or must not carry (save bookkeeping, code to run, a quantisation the float
# weights no longer have): dropped without a note
REWRITTEN_HF_KEYS = frozenset({
    "transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash", "auto_map", "quantization_config",
    "_attn_implementation", "attn_implementation", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype", "architectures",
    "model_type", "attention_bias", "mlp_bias", "head_dim", "hidden_act", "num_labels"})


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", source: dict | None = None) -> dict:
    """A transformers-5 ``config.json`` dict for MistralForCausalLM / LlamaForCausalLM; ``source``: the config.json
    the weights came from, whose ``CARRIED_HF_KEYS`` are kept (any other key it has and the export does not write
    is named in a logged note)."""
    out = {
        "architectures": [SUPPORTED_HF_TYPES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type,
                            **{k: getattr(cfg, f) for k, f in ROPE_KEYS[cfg.rope_type].items()}},
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": hf_eos_value(cfg), "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype, "dtype": dtype, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True,
    }
    if cfg.rope_type != "default":  # the name transformers < 5 reads (it would run the model unscaled without it)
        out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    for key in CARRIED_HF_KEYS:
        if isinstance(source, dict) and key in source and (key != "pretraining_tp" or cfg.model_type == "llama"):
            out[key] = source[key]
    neutral = {"is_causal": True, "attention_chunk_size": None}  # what the model here computes: nothing is lost
    dropped = sorted(k for k, v in (source.items() if isinstance(source, dict) else ()) if k not in out
                     and k not in REWRITTEN_HF_KEYS and k not in CARRIED_HF_KEYS
                     and not (k in neutral and v == neutral[k]))
    if dropped:
        logging.getLogger(__name__).warning(
            "config.json keys of the source not carried to the export (the model here does not read them, and "
            "transformers might, computing something else): %s", ", ".join(dropped))
    return out


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoRAConfig:
    """PEFT-equivalent LoRA: ``y = W x + B(A(dropout(x))) * alpha / r`` on the target projections (``targets``: names
    such as ``q`` or ``q_proj``, a comma-separated string, or ``all`` / peft's ``all-linear`` for all seven)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):
            # "all-linear": peft's name for every linear layer but the LM head, the same seven projections
            targets = LORA_TARGETS if targets in ("all", "all-linear") else tuple(
                t.strip() for t in targets.split(","))
        targets = tuple(t[:-5] if t.endswith("_proj") else t for t in targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad:
            raise UserError(f"lora.targets: unknown module {bad[0]!r}{suggest(bad[0].lower(), LORA_TARGETS)}; "
                            f"choose from {list(LORA_TARGETS)} or 'all'")
        if not targets:
            raise UserError(f"lora.targets is empty: LoRA would train nothing; name at least one of "
                            f"{list(LORA_TARGETS)} or 'all'")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))
        if self.rank <= 0:
            raise UserError(f"lora.rank must be positive, got {self.rank}")
        if not 0.0 < self.alpha < float("inf"):
            raise UserError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict with typo suggestions, used for YAML configs and key=value overrides.

def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, where)  # `lora=0` is an error, not the defaults
    if origin in (tuple, list):
        if isinstance(value, str) and value != "all":  # `a,b` is a list; a list of paths: one that exists is one item
            one_path = where.endswith("sources") and os.path.exists(os.path.expanduser(value))
            value = [value] if one_path else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            v = float(value) if tp is float else (int(value) if not isinstance(value, float) or value.is_integer()
                                                   else None)
            if v is None:
                raise ValueError
            if tp is int and isinstance(value, str):
                v = int(value)
            return v
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is typing.Any:
        return value
    return value


def build(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise a UserError with the nearest valid key."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:  # a section's field (lr: → optim.lr), else the nearest key of this level
            nested = _nested_key(cls, key)
            raise UserError(f"{where}: unknown key {key!r}"
                            + (f" (did you mean '{nested}'?)" if nested else suggest(key, names)))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base, over):
    """``over`` on ``base``: a mapping updates a mapping key by key (``optim: {lr: 1e-4}`` keeps the other optim
    settings of the defaults below it); an empty section (``lora:`` with its keys commented out, or
    ``optim=null``) keeps the defaults' section; any other value replaces."""
    if isinstance(base, dict) and over is None:
        return base
    if not isinstance(base, dict) or not isinstance(over, dict):
        return over
    return {**base, **{k: deep_merge(base.get(k), v) for k, v in over.items()}}


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently).

    Each mapping's own keys are checked once, before PyYAML flattens it (``<<`` merges put the merged keys in
    front of the mapping's own, which may override them; a mapping used as a merge source is flattened early)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()  # ids of the mapping nodes whose own keys were checked

    def flatten_mapping(self, node):
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # complex keys are left to PyYAML
                key = self.construct_scalar(key_node)
                if (key_node.tag, key) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add((key_node.tag, key))
        super().flatten_mapping(node)

    def construct_yaml_int(self, node):
        """Integers as people write them: ``010`` is ten, not YAML 1.1's octal eight; ``1:30`` stays text (YAML 1.1
        reads it as base 60, 90), so an integer field refuses it by name. ``0x``/``0b`` keep their bases (``0o17``
        is no YAML 1.1 integer: text, refused by an integer field)."""
        text = self.construct_scalar(node)
        digits = text.replace("_", "").lstrip("+-")
        if ":" in digits:
            return text
        if len(digits) > 1 and digits[0] == "0" and digits.isdigit():
            return int(text.replace("_", ""), 10)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        """YAML 1.1's base-60 floats (``1:30.5``) stay text."""
        text = self.construct_scalar(node)
        return text if ":" in text else super().construct_yaml_float(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _is_text_field(hint) -> bool:
    """``str`` or ``str | None``: an override's raw text is its value when YAML reads a scalar of another type from it
    (``mesh=0x1`` stays "0x1", not YAML's 1; ``model=yes`` stays "yes")."""
    if hint is str:
        return True
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return union and set(typing.get_args(hint)) == {str, type(None)}


def _nested_key(cls, name: str, prefix: str = "") -> str | None:
    """The dotted key of a field named ``name`` (or what other trainers call ``name``: ``learning_rate`` → ``lr``)
    inside ``cls``'s nested config sections, e.g. ``optim.lr`` for ``lr``; None when there is none."""
    from cancerllm_jax.errors import ALIASES

    wanted = (name, *ALIASES.get(name, ()))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found = next((f"{prefix}{f.name}.{g.name}" for w in wanted for g in dataclasses.fields(hint)
                          if g.name == w), None) or _nested_key(hint, name, f"{prefix}{f.name}.")
            if found:
                return found
    return None


def literal_override(key: str, value: str | list[str]) -> str:
    """``key=value`` that ``apply_overrides`` reads back as exactly ``value`` (a path, or a list of paths): the text
    itself where YAML reads it unchanged (command lines that reproduce.py records stay as they were), else the value
    as a JSON string or list (YAML flow syntax: ` #` and `: ` taken literally), non-ASCII kept as it is (a ``\\u``
    escape of a character past U+FFFF would come back as two lone surrogates)."""
    def reads_back(text: str) -> bool:
        try:
            return yaml.load(text, Loader=_StrictLoader) == value  # noqa: S506 (a SafeLoader)
        except (yaml.YAMLError, ValueError, RecursionError):
            return False

    candidates = ([value] if isinstance(value, str) and value else []) + [
        json.dumps(value, ensure_ascii=False), json.dumps(value)]
    return f"{key}=" + next((c for c in candidates if reads_back(c)), candidates[-1])


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Apply ``a.b=value`` overrides (YAML-parsed values; the raw text for a text field) to a nested dict, checking
    keys against ``cls``."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise UserError(f"override {item!r}: no key before '='")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""  # noqa: S506 (a SafeLoader)
        except yaml.constructor.ConstructorError as e:
            if "duplicate key" in str(e.problem):
                raise UserError(f"override {item!r}: {e.problem}") from None
            value = raw
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of over 4300 digits
            value = raw
        node, tp = data, cls
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            fields_ = {f.name: f for f in dataclasses.fields(tp)}
            if part not in fields_:
                nested = _nested_key(tp, part) if i == len(parts) - 1 else None
                hint = f" (did you mean '{'.'.join(parts[:i] + [nested])}'?)" if nested else suggest(part, fields_)
                raise UserError(f"override {key!r}: unknown key {part!r}{hint}")
            if i == len(parts) - 1:
                if not isinstance(value, (str, list, dict, type(None))) and _is_text_field(
                        typing.get_type_hints(tp)[part]):  # a number, boolean or date YAML read from the text
                    value = raw.strip()
                node[part] = deep_merge(node.get(part), value)
            else:
                hint = typing.get_type_hints(tp)[part]
                if not dataclasses.is_dataclass(hint):
                    raise UserError(f"override {key!r}: {part!r} has no sub-keys")
                node = node.setdefault(part, {})
                if node is None:
                    node = data[part] = {}
                tp = hint
    return data


def _leaves(values: dict, prefix: str = ""):
    """``(dotted key, value)`` of each setting in a nested dict (a non-empty mapping stands for its keys)."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _same_setting(a, b) -> bool:
    """Two command-line values of one setting are the same: as written (``--data a.jsonl`` and
    ``data.sources=[a.jsonl]`` too), as numbers (``1e-4`` and ``0.0001``) or as paths (``./a.jsonl`` and its
    absolute path)."""
    def norm(v, path):
        if isinstance(v, (list, tuple)):
            return [norm(x, path) for x in v]
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return v
        try:
            return float(v)
        except ValueError:
            return os.path.normpath(os.path.abspath(os.path.expanduser(v))) if path else v

    if isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python, not as settings
        return False
    for path in (False, True):
        x, y = norm(a, path), norm(b, path)
        if isinstance(x, list) != isinstance(y, list):  # one path, or a list of that one path
            x, y = (x if isinstance(x, list) else [x]), (y if isinstance(y, list) else [y])
        if x == y:
            return True
    return False


def check_given_once(cls, overrides: list[str], given=()) -> None:
    """Refuse a setting given twice on the command line with different values: by a flag (``given``: pairs of the
    flag as typed and a dict of the settings it sets, e.g. ``("--steps 1", {"steps": 1})``) and a ``key=value``
    override, or by two overrides (``lora.rank=8 lora.rank=9``). The same value twice is accepted."""
    seen: dict[str, tuple[str, object]] = {}
    for spelling, values in [*given, *((o, apply_overrides({}, [o], cls)) for o in overrides)]:
        for key, value in _leaves(values):
            if key in seen and not _same_setting(seen[key][1], value):
                raise UserError(f"{key} is given twice ({seen[key][0]} and {spelling}); give it once")
            seen.setdefault(key, (spelling, value))


def load_yaml(path: str) -> dict:
    """A YAML config file as a dict; invalid YAML, a key given twice, non-UTF-8 text or a top level that is no
    mapping is a UserError naming the file (and the line)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except (ValueError, RecursionError) as e:  # an int of over 4300 digits; nesting deeper than Python's stack
        raise UserError(f"{path}: invalid YAML ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


_ = field  # re-exported for config modules that build on this one
