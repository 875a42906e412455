"""Optax AdamW with HF Trainer's schedules (linear warmup, then cosine / linear decay) and global-norm clipping."""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import optax

from cancerllm_jax.errors import UserError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW as ``torch.optim.AdamW``; the schedule counts optimiser steps from 0 like HF's schedulers."""

    lr: float = 2e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise UserError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.lr < math.inf:
            raise UserError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 < self.eps < math.inf:  # eps=0 divides 0 by 0 where a gradient is 0 (LoRA A at step 1)
            raise UserError(f"optim.eps must be positive, got {self.eps}")
        for name in ("weight_decay", "clip_norm"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise UserError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """HF's ``get_{cosine,linear,constant}_schedule_with_warmup`` as an optax schedule."""
    warm = warmup_steps(cfg, total_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(total_steps, warm + 1), 0.0)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warm, 1))
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask(params):
    """Weight decay on every weight except norms (HF Trainer's rule; LoRA factors do decay)."""
    def mask(path, _):
        names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
        return not any(str(n).endswith("norm") for n in names)

    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    sched = schedule(cfg, total_steps)
    adamw = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm and cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
