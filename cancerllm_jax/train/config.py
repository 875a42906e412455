"""Typed training configs shared by continued pretraining and instruction tuning."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from cancerllm_jax.config import (LoRAConfig, apply_overrides, build, check_given_once, deep_merge, load_yaml,
                                   to_dict)
from cancerllm_jax.data.pretrain import PretrainDataConfig
from cancerllm_jax.errors import UserError
from cancerllm_jax.train.optim import OptimConfig


MAX_COUNT = 2**31 - 1  # steps are counted, and arrays shaped, in int32: a larger value overflows inside XLA


@dataclass(frozen=True)
class TrainConfig:
    """What every training run needs. ``batch_size`` is the GLOBAL batch (rows per optimiser step)."""

    model: str = "tiny"  # a preset (tiny, mistral-7b-v0.1), an HF folder, a converted checkpoint or a run
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    full: bool = False  # train every weight (Me-LLaMA style) instead of LoRA
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 30
    batch_size: int = 20
    seed: int = 0
    mesh: str = "1x1"
    dtype: str = "auto"  # auto: bfloat16 base on accelerators, float32 on CPU
    remat: str = "none"  # none | full | dots
    attention: str = "auto"  # auto (cuDNN flash attention on a GPU in bf16, else xla) | xla | cudnn
    # auto (per_layer on a GPU without remat) | stacked (one scan over the stacked weights: quick to compile) |
    # per_layer (the frozen weights one array per layer, the layers a Python loop: no per-layer weight copies on a
    # GPU, a longer compile)
    layer_weights: str = "auto"
    fsdp: bool = True  # shard frozen weights over the data axis where a dimension divides
    # 0: only at the end; N: every N steps; a fraction in (0, 1): every ceil(steps x fraction) steps, as HF Trainer
    # reads save_steps / eval_steps below 1 (the paper's eval_steps 0.2)
    save_every: int | float = 0
    keep: int = 3
    eval_every: int | float = 0  # 0: only at the end; as save_every
    eval_batches: int = 0  # 0: every held-out batch
    log_every: int = 1
    log_examples: bool = False  # never log note text unless asked

    def every(self, name: str) -> int:
        """``save_every`` / ``eval_every`` in steps (0: only at the end); a fraction of the run is
        ``ceil(steps * fraction)``, as HF Trainer counts it."""
        value = getattr(self, name)
        return math.ceil(self.steps * value) if isinstance(value, float) else value

    def validate(self) -> None:
        for name in ("steps", "batch_size", "keep", "log_every", "save_every", "eval_every", "eval_batches"):
            low = 1 if name in ("steps", "batch_size", "keep", "log_every") else 0
            if not low <= getattr(self, name) <= MAX_COUNT:
                raise UserError(f"{name} must be >= {low} and at most 2**31 - 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0 < value < 1:
                raise UserError(f"{name} must be a whole number of steps or a fraction of the run in (0, 1), "
                                f"got {value}")
        if not 0 <= self.seed < 2**32:  # JAX keeps a seed's low 32 bits: 2**32 + 5 would quietly be seed 5
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.remat not in ("none", "full", "dots"):
            raise UserError(f"remat must be none, full or dots, got {self.remat!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise UserError(f"attention must be auto, xla or cudnn, got {self.attention!r}")
        if self.layer_weights not in ("auto", "stacked", "per_layer"):
            raise UserError(f"layer_weights must be auto, stacked or per_layer, got {self.layer_weights!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.batch_size % self.optim.grad_accum:
            raise UserError(f"batch_size {self.batch_size} is not divisible by optim.grad_accum "
                            f"{self.optim.grad_accum}")


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """Continued pretraining. With no ``data.sources`` the built-in synthetic clinical corpus is used."""

    data: PretrainDataConfig = field(
        default_factory=lambda: PretrainDataConfig(block_size=128, eval_fraction=0.05))
    synthetic_documents: int = 400
    epochs: float | None = None  # set: steps = epochs passes over the train blocks (read first), as HF counts them

    def validate(self) -> None:
        TrainConfig.validate(self)
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise UserError(f"epochs must be positive, got {self.epochs}")
        self.data.validate()  # here too, so that --dry-run refuses what the data pipeline would
        if not self.data.sources and self.synthetic_documents < 1:
            raise UserError(f"synthetic_documents must be >= 1 (no data.sources given), got {self.synthetic_documents}")
        if self.batch_size * self.data.block_size > MAX_COUNT:
            raise UserError(f"batch_size {self.batch_size} x data.block_size {self.data.block_size} tokens per step "
                            f"is more than 2**31 - 1; lower one of them")


# Fields that may change between a run and its resumption; every other field must match.
RESUMABLE_CHANGES = {"mesh", "layer_weights", "save_every", "eval_every", "eval_batches", "log_every", "keep",
                     "log_examples"}


def resolve(cls, config_path: str | None, overrides: list[str], cli: dict | None = None,
            flags: list[tuple[str, str]] = ()):
    """Defaults ← YAML file ← the command line: ``--flag`` values (``cli``: top-level fields by name; ``flags``:
    ``(flag as typed, key=value)`` for flags that set other fields, e.g. ``("--data a.jsonl", "data.path=a.jsonl")``)
    and ``key=value`` overrides, section by section (a YAML ``optim`` with only ``lr`` keeps the other optim defaults
    of ``cls``); unknown keys are errors. From a command line (``cli`` or ``flags`` given, as the launchers give
    them) a setting given twice with different values is an error too (``--steps 1 steps=2``, ``lora.rank=8
    lora.rank=9``); called with ``overrides`` alone, a later override of a key replaces an earlier one."""
    if cli is not None or flags:
        given = [(_flag_spelling(k, v), {k: v}) for k, v in (cli or {}).items() if v is not None]
        check_given_once(cls, overrides, given + [(spelling, apply_overrides({}, [o], cls)) for spelling, o in flags])
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    data = to_dict(cls()) if config_path is None else deep_merge(to_dict(cls()), load_yaml(config_path))
    where = config_path or "config"
    base = build(cls, data, where)  # validates the YAML's keys and types
    data = to_dict(base)
    data.update(cli)
    data = apply_overrides(data, [o for _, o in flags] + list(overrides), cls)
    cfg = build(cls, absolute_paths(data), "config")
    cfg.validate()
    return cfg


def _flag_spelling(name: str, value) -> str:
    """The flag that gave the field ``name`` as typed: ``--batch-size 4``, ``--full``, ``--epochs 2``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


_NAMED_TOKENIZERS = (None, "", "mistral-v1", "mistral")


def absolute_path(p):
    """``p`` (``~`` expanded) joined to the current folder, not normalised: ``link/../x`` stays the file the OS opens
    through the link. Anything but a non-empty string is returned as it is."""
    if not isinstance(p, str) or not p:
        return p
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.join(os.getcwd(), p)


def absolute_paths(data: dict) -> dict:
    """A config dict whose file and folder settings (``model`` unless a preset, ``data.path``, ``data.eval_path``,
    ``data.sources``, ``data.tokenizer`` unless a name) are absolute, read from the current folder: the run records
    what it read, and ``--resume`` from another folder compares the same files."""
    from cancerllm_jax.config import PRESETS

    data = dict(data)
    if isinstance(data.get("model"), str) and data["model"] not in PRESETS:
        data["model"] = absolute_path(data["model"])
    if isinstance(data.get("data"), dict):
        d = data["data"] = dict(data["data"])
        for key in ("path", "eval_path"):
            if key in d:
                d[key] = absolute_path(d[key])
        if isinstance(d.get("sources"), (list, tuple)):
            d["sources"] = [absolute_path(s) for s in d["sources"]]
        if d.get("tokenizer") not in _NAMED_TOKENIZERS:
            d["tokenizer"] = absolute_path(d["tokenizer"])
    return data


def diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, name + ".")
        elif _norm(va) != _norm(vb):
            out.append(name)
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v



