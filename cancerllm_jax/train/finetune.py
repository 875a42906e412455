"""Instruction tuning (CancerLLM stage 2): config and data wiring for the shared training loop."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cancerllm_jax.config import LoRAConfig
from cancerllm_jax.data.instruct import InstructDataConfig
from cancerllm_jax.errors import UserError, suggest
from cancerllm_jax.train.config import TrainConfig
from cancerllm_jax.train.optim import OptimConfig

TASKS = ("phenotype", "diagnosis", "treatment_plan", "radonc_regimen", "radonc_modality", "radonc_icd10")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Defaults from the authors' script: r 64, α 16, dropout 0.1, lr 2e-4, 5 epochs, clip 0.3, warmup 0.03.

    Their batch 1 × grad-accum 4 is a global batch of 4 here. ``steps: 0`` derives the steps from ``epochs``.
    With no ``data.path`` the built-in synthetic data of ``task`` is used.
    """

    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=64, alpha=16.0, dropout=0.1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, clip_norm=0.3, warmup_ratio=0.03,
                                                                   weight_decay=0.0, schedule="linear"))
    data: InstructDataConfig = field(default_factory=lambda: InstructDataConfig(max_seq_len=512))
    task: str = "diagnosis"
    epochs: float = 5.0
    steps: int = 0
    batch_size: int = 4
    eval_every: int | float = 0  # 0: every epoch, as the authors' script does (pretraining's 0: only at the end)
    synthetic_patients: int = 60

    def validate(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task {self.task!r} is unknown{suggest(self.task, TASKS)}; choose from {list(TASKS)}")
        if self.steps < 0:
            raise UserError(f"steps must be >= 0 (0: derived from epochs), got {self.steps}")
        if not 0 < self.epochs < float("inf"):
            raise UserError(f"epochs must be positive, got {self.epochs}")
        self.data.validate()  # caught by --dry-run too, not only once the data is built
        TrainConfig.validate(dataclasses.replace(self, steps=max(self.steps, 1)))


def synthetic_split(task: str, patients: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, val, test)`` records of one synthetic task."""
    from cancerllm_jax.data.synthetic import instruction_datasets

    data = instruction_datasets(patients, seed=seed)[task]
    return data["train"], data["val"], data["test"]


def load_records(cfg: FinetuneConfig):
    """``(train, eval)`` examples: ``None`` for what the user's JSONL gives (``data.path``, ``data.eval_path``, read
    by ``build_instruct_data``), else the synthetic data's split of ``task``."""
    if cfg.data.path:
        return None, None
    train, val, _ = synthetic_split(cfg.task, cfg.synthetic_patients, cfg.data.seed)
    return train, (None if cfg.data.eval_path else val)
