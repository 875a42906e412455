"""PEFT LoRA adapters ⇄ our LoRA factors.

PEFT stores one ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` per layer and projection under
``base_model.model.model.layers.{i}.self_attn.q_proj`` (etc.), plus an ``adapter_config.json``; we keep
``lora_a [layers, in, r]`` and ``lora_b [layers, r, out]``. Missing or unexpected keys are errors, never warnings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np

from cancerllm_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from cancerllm_jax.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model.model.layers"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# what a field left out of adapter_config.json means when peft loads it (its LoraConfig's defaults; its
# target_modules for Mistral and Llama, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "use_qalora": False}
# set, these change which weights get factors or what the layer computes (LoRA variants of peft 0.21)
_EMPTY = ("modules_to_save", "layer_replication",
          "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
          "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config")
# fields that do not change a plain LoRA's forward (bookkeeping, training-time or initialisation-only settings,
# and settings for features refused above; peft sets fan_in_fan_out to False on nn.Linear, every target here) and
# fields read below (use_rslora, layers_to_transform, layers_pattern, exclude_modules, rank_pattern, alpha_pattern);
# any other field that is set
# is an error: a newer peft's variant
_HARMLESS = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights",
             "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern", "exclude_modules",
             "rank_pattern", "alpha_pattern",
             "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
             "qalora_group_size", "runtime_config", "ensure_weight_tying")
# initialisations after which peft rewrites the base weights when it loads the adapter: the factors alone are not
# the model (such adapters load here only after peft's conversion to a plain LoRA, path_initial_model_for_...)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def peft_key(layer: int, target: str, factor: str) -> str:
    """PEFT's saved key, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{PREFIX}.{layer}.{HF_MODULES[target]}.lora_{factor}.weight"


def adapter_config(lora_cfg: LoRAConfig, base_name_or_path: str | None) -> dict:
    """The ``adapter_config.json`` dict that ``peft.PeftModel.from_pretrained`` reads."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path,
        "r": int(lora_cfg.rank), "lora_alpha": float(lora_cfg.alpha), "lora_dropout": float(lora_cfg.dropout),
        "target_modules": [HF_MODULES[t].split(".")[-1] for t in lora_cfg.targets], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def _layers(lora_params: dict) -> dict:
    return lora_params.get("layers", lora_params)


def iter_peft_tensors(cfg: ModelConfig, lora_cfg: LoRAConfig, lora_params: dict, dtype: str | None = None):
    """Yield ``(peft_key, numpy array)`` for every layer and target; a missing or mis-shaped factor is an error."""
    from cancerllm_jax.model.mistral import proj_shapes

    layers = _layers(lora_params)
    extra = sorted(set(layers) - set(lora_cfg.targets))
    if extra:
        raise UserError(f"LoRA factors for {extra} are not in the LoRA targets {list(lora_cfg.targets)}")
    shapes = proj_shapes(cfg)
    for t in lora_cfg.targets:
        if t not in layers or "lora_a" not in layers[t] or "lora_b" not in layers[t]:
            raise UserError(f"LoRA factors for target {t!r} are missing")
        d_in, d_out = shapes[t]
        a, b = np.asarray(layers[t]["lora_a"]), np.asarray(layers[t]["lora_b"])
        for name, arr, want in (("lora_a", a, (cfg.num_layers, d_in, lora_cfg.rank)),
                                ("lora_b", b, (cfg.num_layers, lora_cfg.rank, d_out))):
            if tuple(arr.shape) != want:
                raise UserError(f"LoRA {t}.{name}: shape {tuple(arr.shape)}, expected {want}")
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(_np_dtype(dtype)))
    for i in range(cfg.num_layers):
        for t in lora_cfg.targets:
            yield peft_key(i, t, "A"), np.ascontiguousarray(cast(np.asarray(layers[t]["lora_a"][i]).T))
            yield peft_key(i, t, "B"), np.ascontiguousarray(cast(np.asarray(layers[t]["lora_b"][i]).T))


def write_peft_adapter(out_dir: str, cfg: ModelConfig, lora_cfg: LoRAConfig, lora_params: dict,
                       base_name_or_path: str | None = None, overwrite: bool = False, dtype: str | None = None,
                       tokenizer_dir: str | None = None) -> list[str]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically; returns the files written."""
    from safetensors.numpy import save_file

    from cancerllm_jax.checkpoint.orbax_io import atomic_dir, copy_tokenizer_files

    tensors = dict(iter_peft_tensors(cfg, lora_cfg, lora_params, dtype))
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config(lora_cfg, base_name_or_path), f, indent=2)
        files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
        if tokenizer_dir:
            files += copy_tokenizer_files(tokenizer_dir, tmp)
    return files


def _adapter_json(folder: str) -> tuple[str, dict]:
    """``(path, dict)`` of the folder's ``adapter_config.json``."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter folder)")
    from cancerllm_jax.data.sources import json_type_name, load_json_file

    conf = load_json_file(path, "not valid JSON", unique_keys=False)  # as peft reads it; bad UTF-8: path:line
    if not isinstance(conf, dict):
        raise UserError(f"{path}: expected a JSON object, got {json_type_name(conf)}")
    return path, conf


def adapter_base_name(folder: str) -> str | None:
    """The adapter's ``base_model_name_or_path`` (a hub id or a path; informative only)."""
    return _adapter_json(folder)[1].get("base_model_name_or_path")


def _module_name(layer: int, target: str) -> str:
    """The base model's name of a projection, as peft matches ``target_modules`` against it."""
    return f"model.layers.{layer}.{HF_MODULES[target]}"


def _other_module_names(num_layers: int) -> list[str]:
    """The names of the base model's modules that are not LoRA projections (peft's target_modules could match them:
    it would adapt the LM head or the embeddings, and refuse a block or a norm)."""
    per_layer = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")
    return ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head",
            *(f"model.layers.{i}{m}" for i in range(num_layers) for m in per_layer)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite JSON number (not a boolean, not a string such as "8", which peft fails on)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(path: str, conf: dict, key: str, item) -> None:
    """``conf[key]`` is null, one ``item`` or a list of them (a string: a valid regular expression)."""
    value = conf.get(key)
    one = _is_int if item is int else (lambda v: isinstance(v, str))
    if not (value is None or one(value) or isinstance(value, list) and all(one(v) for v in value)):
        what = "a layer index or a list of them" if item is int else "a string or a list of strings"
        raise UserError(f"{path}: {key} must be {what}, got {json.dumps(value)}")
    for pattern in ([value] if isinstance(value, str) else []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"{path}: {key} {pattern!r} is not a valid regular expression ({e})") from None


def _peft_matcher(path: str, conf: dict):
    """``adapts(name) -> bool``: whether peft (0.21, ``check_target_module_exists``) puts LoRA on the base model's
    module ``name`` under this config: ``exclude_modules``, then ``target_modules`` (a regular expression that must
    match the whole name; or names, whole or as the name's last parts), then ``layers_to_transform`` with
    ``layers_pattern`` (list targets only, as in peft)."""
    for key, item in (("target_modules", str), ("exclude_modules", str), ("layers_pattern", str),
                      ("layers_to_transform", int)):
        _check_field(path, conf, key, item)
    targets, exclude = conf.get("target_modules"), conf.get("exclude_modules")
    indexes, layers_pattern = conf.get("layers_to_transform"), conf.get("layers_pattern")
    use_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if not layers_pattern:  # peft: no (or an empty) layers_pattern takes the name's first numbered part
        layer_res = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    else:
        layer_res = []
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            try:
                layer_res.append(re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."))
            except re.error as e:
                raise UserError(f"{path}: layers_pattern {p!r} is not a valid regular expression ({e})") from None

    def layer_of(name: str) -> int | None:
        match = next((m for r in layer_res if (m := r.match(name))), None)
        return int(match.group("idx")) if match else None

    def adapts(name: str) -> bool:
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, name):
                    return False
            elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
                return False
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True
        found = any(name.endswith(f".{t}") for t in targets)
        if found and use_indexes:
            layer = layer_of(name)
            return layer is not None and (layer == indexes if isinstance(indexes, int) else layer in indexes)
        return found

    return adapts


def _pattern(path: str, conf: dict, key: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: ``{regular expression: rank (a whole number >= 1) / alpha (a number)}``."""
    value = conf.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} must be an object {{module pattern: value}}, got {json.dumps(value)}")
    for pattern, v in value.items():
        ok = _is_int(v) and v >= 1 if key == "rank_pattern" else _is_number(v)
        if not ok:
            what = "a whole number >= 1" if key == "rank_pattern" else "a finite number"
            raise UserError(f"{path}: {key}[{pattern!r}] must be {what}, got {json.dumps(v)}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"{path}: {key} key {pattern!r} is not a valid regular expression ({e})") from None
    return value


def _matching_keys(pattern: dict, name: str) -> list[str]:
    """The keys (regular expressions) of a ``rank_pattern`` / ``alpha_pattern`` that match the end of the module
    ``name`` at a dot, in file order, as peft's ``get_pattern_key`` tries them."""
    return [key for key in pattern if re.match(rf"(.*\.)?({key})$", name)]


def _pattern_value(pattern: dict, name: str, default):
    """peft's ``get_pattern_key``: the value of the first key that matches module ``name``, else ``default``."""
    keys = _matching_keys(pattern, name)
    return pattern[keys[0]] if keys else default


ModuleFactors = dict[tuple[str, int], tuple[int, float]]  # (target, layer) -> (its rank, its scale); config scale 1


def _read_config(folder: str, num_layers: int | None) -> tuple[LoRAConfig, dict[str, list[int]], ModuleFactors]:
    """``(LoRAConfig, {target: the layers peft adapts}, per-module ranks and scales)`` from a PEFT
    ``adapter_config.json`` for a model of ``num_layers`` layers (None: not known yet); features we do not implement
    are errors. With ``rank_pattern`` / ``alpha_pattern`` the config's rank is the largest module rank (smaller
    modules are zero-padded: the same product) and each module's own scale is a factor on its B; without them the
    per-module map is empty."""
    path, conf = _adapter_json(folder)
    if str(conf.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{path}: peft_type {conf.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in _UNSUPPORTED.items():
        if bool(conf.get(key, ok)) != ok:
            raise UserError(f"{path}: {key}={conf[key]!r} is not supported")
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UserError(f"{path}: init_lora_weights={init!r} changes the base weights when peft loads the adapter; "
                        "convert it to a plain LoRA adapter with peft first (path_initial_model_for_weight_conversion)")
    if conf.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={conf['bias']!r} is not supported (only 'none')")
    for key in _EMPTY:  # set: not null, false or empty
        if conf.get(key) is not None and conf[key] is not False and conf[key] not in ("", [], {}):
            raise UserError(f"{path}: {key}={conf[key]!r} is not supported")
    unknown = [k for k, v in conf.items() if v and k not in (*_HARMLESS, *_UNSUPPORTED, *_EMPTY, "bias")]
    if unknown:
        raise UserError(f"{path}: field {unknown[0]}={conf[unknown[0]]!r} is not known here (a LoRA variant of a "
                        "newer peft?); only plain LoRA adapters are supported")
    targets = conf.get("target_modules")
    if targets is None:  # peft's default for Mistral and Llama (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
        targets = PEFT_DEFAULTS["target_modules"]
        conf = {**conf, "target_modules": targets}
    for key in ("layers_to_transform", "layers_pattern"):  # as peft's LoraConfig refuses them
        if isinstance(targets, str) and conf.get(key) is not None:
            raise UserError(f"{path}: {key} cannot be used when target_modules is a string ({targets!r}), as in peft")
    if conf.get("layers_pattern") and conf.get("layers_to_transform") is None:
        raise UserError(f"{path}: layers_pattern {conf['layers_pattern']!r} needs layers_to_transform, as in peft")
    names = sorted(HF_MODULES[t].split(".")[-1] for t in LORA_TARGETS)
    if isinstance(targets, str) and targets.lower() == "all-linear":  # peft: every linear layer but the output layer
        conf = {**conf, "target_modules": names}
    elif not isinstance(targets, str) and not (isinstance(targets, list) and targets):
        raise UserError(f"{path}: target_modules must be a list of module names or a regular expression, got "
                        f"{json.dumps(targets)}")
    adapts = _peft_matcher(path, conf)
    n = num_layers or 1024
    other = [m for m in _other_module_names(n) if adapts(m)]
    if other:  # peft would adapt (lm_head, embed_tokens) or refuse (a block, a norm) a module other than these
        raise UserError(f"{path}: target_modules {targets!r} adapt {other[0]}, which is not a LoRA projection here "
                        f"(choose from {names})")
    if isinstance(targets, list) and num_layers is not None:  # peft ignores a name no module is or ends with
        known = [*_other_module_names(n), *(_module_name(i, t) for i in range(n) for t in LORA_TARGETS)]
        absent = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in known)]
        if absent:
            log.warning("%s: target_modules %s name no module of this %d-layer model; ignored, as peft ignores "
                        "them", path, absent, num_layers)
    layers = {t: [i for i in range(n) if adapts(_module_name(i, t))] for t in LORA_TARGETS}
    layers = {t: ids for t, ids in layers.items() if ids}
    if not layers:
        settings = "".join(f", {k} {conf[k]!r}" for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
                           if conf.get(k) not in (None, "", []))
        where = f"its {num_layers} layers" if num_layers is not None else "any layer"
        raise UserError(f"{path}: target_modules {targets!r}{settings} adapt none of {sorted(names)} in {where} "
                        "(model.layers.N.*)")
    r = conf.get("r", PEFT_DEFAULTS["r"])
    if isinstance(r, bool) or not (isinstance(r, int) or isinstance(r, float) and r.is_integer()):
        raise UserError(f"{path}: r must be a whole number, got {json.dumps(r)}")  # int(8.5) would be rank 8
    rank_pattern, alpha_pattern = _pattern(path, conf, "rank_pattern"), _pattern(path, conf, "alpha_pattern")
    rslora = conf.get("use_rslora")
    if rslora not in (None, True, False):  # "false" would be truthy
        raise UserError(f"{path}: use_rslora must be true or false, got {json.dumps(rslora)}")
    alpha = _json_number(path, conf, "lora_alpha", PEFT_DEFAULTS["lora_alpha"])
    _json_number(path, conf, "lora_dropout", 0.0)
    if rank_pattern or alpha_pattern or alpha <= 0:
        # peft: each module's own rank and alpha, the config's r / alpha as defaults; an alpha of 0 or below (an
        # adapter that subtracts) takes this path too, as a LoRAConfig's alpha is positive

        def scale(rank: int, alpha_: float) -> float:
            return alpha_ / math.sqrt(rank) if rslora else alpha_ / rank

        own = {(t, i): (int(_pattern_value(rank_pattern, _module_name(i, t), int(r))),
                        float(_pattern_value(alpha_pattern, _module_name(i, t), alpha)))
               for t, ids in layers.items() for i in ids}
        unranked = [k for k, (r_, _) in own.items() if r_ < 1]
        if unranked:
            t, i = unranked[0]
            raise UserError(f"{path}: r {int(r)} must be positive: it is the rank of {_module_name(i, t)}, which no "
                            "rank_pattern key matches")
        widest = max(r_ for r_, _ in own.values())
        lora = _lora_config(path, conf, widest, float(widest), layers)  # scaling 1: each B carries its own scale
        return lora, layers, {k: (r_, scale(r_, a_)) for k, (r_, a_) in own.items()}
    lora = _lora_config(path, conf, r, alpha, layers)
    # use_rslora: peft scales by alpha / sqrt(r), the same as alpha * sqrt(r) / r
    lora = dataclasses.replace(lora, alpha=lora.alpha * math.sqrt(lora.rank)) if rslora else lora
    return lora, layers, {}


def _rank_source(folder: str, name: str) -> tuple[str, str]:
    """``(the setting that gives module name its rank, why it may be wrong or "")`` for an error: the config's
    ``r``, one ``rank_pattern`` key, or the first of several keys that match it (peft saves the keys sorted, so
    overlapping keys may pick another rank than when the adapter was made)."""
    pattern = _adapter_json(folder)[1].get("rank_pattern") or {}
    keys = _matching_keys(pattern, name)
    if len(keys) < 2:
        return (f"rank_pattern key {keys[0]!r}" if keys else "the config's r"), ""
    return (f"rank_pattern key {keys[0]!r} (the first of {len(keys)} keys that match it)",
            ": peft saves the keys sorted, so overlapping keys can pick another rank than when the adapter was made "
            "(peft cannot load it either); make each module match one key")


def _json_number(path: str, conf: dict, key: str, default=None):
    """``conf[key]`` (``default`` when absent) if it is a finite JSON number, else one error naming it."""
    value = conf.get(key, default)
    if not _is_number(value):
        raise UserError(f"{path}: {key} must be a number, got {json.dumps(value)}")
    return value


def _lora_config(path: str, conf: dict, rank, alpha, layers: dict) -> LoRAConfig:
    """``LoRAConfig`` of an adapter's rank, alpha, dropout and adapted targets; bad values name the config."""
    try:
        return LoRAConfig(rank=int(rank), alpha=float(alpha), dropout=float(conf.get("lora_dropout", 0.0)),
                          targets=tuple(layers))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: r / lora_alpha / lora_dropout must be numbers ({e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e} (from r / lora_alpha / lora_dropout)") from None


def read_adapter_config(folder: str, num_layers: int | None = None) -> LoRAConfig:
    """LoRAConfig from a PEFT ``adapter_config.json`` (its targets: the projections peft adapts in at least one
    of ``num_layers`` layers, None: of any model); features we do not implement are errors."""
    return _read_config(folder, num_layers)[0]


def check_adapter_folder(folder: str) -> LoRAConfig:
    """The checks that need no base model: a folder with a supported config and safetensors weights."""
    return _checked_folder(folder, None)[0]


def _checked_folder(folder: str, num_layers: int | None) -> tuple[LoRAConfig, dict[str, list[int]], ModuleFactors]:
    """``_read_config`` of a folder that exists and holds safetensors weights."""
    if not os.path.isdir(folder):
        what = "is not a folder (expected a PEFT adapter folder)" if os.path.exists(folder) else "not found"
        raise UserError(f"adapter {folder}: {what}")
    config = _read_config(folder, num_layers)
    if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise UserError(f"{folder}: only a pickle adapter_model.bin found; pickle files are never loaded "
                            "(save the adapter with safetensors)")
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return config


def read_peft_adapter(folder: str, cfg: ModelConfig) -> tuple[LoRAConfig, dict]:
    """``(LoRAConfig, lora_params)`` from a PEFT adapter folder, ``lora_params`` as ``{"layers": {t: {a, b}}}``."""
    from safetensors import SafetensorError, safe_open

    from cancerllm_jax.model.mistral import proj_shapes

    n = cfg.num_layers
    lora_cfg, adapted, own = _checked_folder(folder, n)
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        handle = safe_open(path, framework="numpy")
        keys = set(handle.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: corrupt or not a safetensors file ({e})") from None
    keys = {k: k for k in keys}
    # Some writers keep the adapter name ("...q_proj.lora_A.default.weight"): accept it.
    keys = {k.replace(".default.weight", ".weight"): v for k, v in keys.items()}
    shapes = proj_shapes(cfg)
    r = lora_cfg.rank
    other = f" (an adapter for another base model? this one has {n} layers, hidden size {cfg.hidden_size})"
    out: dict = {}
    used = set()
    for t in lora_cfg.targets:
        d_in, d_out = shapes[t]
        # a layer the adapter leaves out (layers_to_transform, names or a pattern of some layers) keeps zero factors:
        # its product is exactly zero, the base layer as in peft
        a = np.zeros((n, d_in, r), np.float32)
        b = np.zeros((n, r, d_out), np.float32)
        for i in adapted[t]:
            rank, factor_b = own.get((t, i), (r, 1.0))  # rank_pattern / alpha_pattern: its own rank and scale
            for factor, dst, want in (("A", a, (rank, d_in)), ("B", b, (d_out, rank))):
                key = peft_key(i, t, factor)
                if key not in keys:
                    raise UserError(f"{path}: tensor {key} is missing{other}")
                arr = handle.get_tensor(keys[key])
                if tuple(arr.shape) != want:
                    fits = len(arr.shape) == 2 and (arr.shape[1] == d_in if factor == "A" else arr.shape[0] == d_out)
                    if own and fits:  # only the rank differs: say where the rank came from
                        source, why = _rank_source(folder, _module_name(i, t))
                        raise UserError(f"{path}: tensor {key} has rank "
                                        f"{arr.shape[0] if factor == 'A' else arr.shape[1]}, but {source} gives "
                                        f"{_module_name(i, t)} rank {rank}{why or other}")
                    raise UserError(f"{path}: tensor {key} has shape {tuple(arr.shape)}, expected {want}{other}")
                if factor == "A":  # rows past the module's rank stay zero: the same product
                    dst[i, :, :rank] = arr.astype(np.float32).T
                else:
                    dst[i, :rank, :] = arr.astype(np.float32).T * np.float32(factor_b) if factor_b != 1.0 \
                        else arr.astype(np.float32).T
                used.add(key)
        out[t] = {"lora_a": a, "lora_b": b}
    extra = sorted(set(keys) - used)
    if extra:
        raise UserError(f"{path}: unexpected tensor(s) {extra[:5]}{'…' if len(extra) > 5 else ''} "
                        f"(not LoRA factors of the projections its adapter_config.json adapts in a {n}-layer model)")
    return lora_cfg, {"layers": out}


def _np_dtype(name: str):
    import ml_dtypes

    table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if name not in table:
        raise UserError(f"dtype {name!r} is not supported; choose from {sorted(table)}")
    return table[name]
