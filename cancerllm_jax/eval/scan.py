"""Temperature scan (seed 003): every model decodes every task at T = 0.1 … 1.0, and the first model is tested
against each other one with the one-sided Wilcoxon signed-rank test over the scan ("fine-tuned > vanilla").

Each temperature is an ordinary ``evaluate.py run`` folder, ``OUT/T0.1`` … ``OUT/T1.0``, so an interrupted scan
resumes where it stopped and each folder can be re-scored alone. The scan's score per (task, model, T) is the
paper's: ROUGE-1 for the RT regimen, accuracy for the RT modality and ICD-10 code (fractions), and Average F1
(percent) for the CancerLLM tasks. ``OUT/scan.json`` holds every score, the highest and median per (task, model)
and the tests — per task (n = number of temperatures) and "overall" (every task's pairs together, fractions as
percent, as the paper's Table 1); ``OUT/scan.md`` and ``OUT/scan.png`` show them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cancerllm_jax.errors import UserError
from cancerllm_jax.eval.radonc import temperature_scan, wilcoxon_greater
from cancerllm_jax.eval.runner import RunConfig, log_stderr, run
from cancerllm_jax.train.run_io import write_text_atomic

TEMPERATURES = tuple(round(0.1 * i, 1) for i in range(1, 11))
# task -> (where the score is in a run's results[task][model], its name)
_RADONC_SCORE = {"radonc_regimen": ("rouge1", "ROUGE-1"), "radonc_modality": ("accuracy", "accuracy"),
                 "radonc_icd10": ("accuracy", "accuracy")}


def scan_score(task: str, result: dict[str, Any]) -> float:
    """The scan's score of one (task, model) result of a run: the paper's RT metric, else Average F1."""
    if task in _RADONC_SCORE:
        extra = result.get("radonc") or {}
        key = _RADONC_SCORE[task][0]
        if key not in extra:
            raise UserError(f"{task}: the run has no {key!r} score ({extra.get('error', 'no radonc metrics')})")
        return float(extra[key])
    return float(result["avg_f1"])


def _percent(task: str) -> float:
    """The factor that puts ``task``'s scan score in percent (the RT scores are fractions)."""
    return 100.0 if task in _RADONC_SCORE else 1.0


def score_name(task: str) -> str:
    return _RADONC_SCORE.get(task, (None, "Average F1 (%)"))[1]


def parse_temperatures(text: str | None) -> list[float]:
    """``"0.1,0.5,1.0"`` → [0.1, 0.5, 1.0]; None → 0.1 … 1.0 in steps of 0.1 (the paper's scan)."""
    if text is None:
        return list(TEMPERATURES)
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]  # "" (an empty shell variable): none, refused
    except ValueError:
        raise UserError(f"--temperatures {text!r}: expected comma-separated numbers") from None
    # the scan rounds them to 6 decimals: each must stay > 0 (0 is greedy) and have a folder name of its own
    if not temps or any(not np.isfinite(t) or round(t, 6) <= 0 for t in temps) \
            or len({f"{round(t, 6):g}" for t in temps}) != len(temps):
        raise UserError(f"--temperatures {text!r}: give temperatures ≥ 0.000001 (sampling; 0 is greedy) that differ "
                        "in the first 6 decimals")
    return temps


def run_scan(cfg: RunConfig, temperatures: Sequence[float] = TEMPERATURES,
             log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Run ``cfg`` once per temperature (``OUT/T<t>``), then write ``scan.json``, ``scan.md`` and ``scan.png``."""
    temps = [round(float(t), 6) for t in temperatures]
    runs: dict[float, dict[str, Any]] = {}
    for t in temps:
        log(f"temperature {t:g}: {os.path.join(cfg.out, f'T{t:g}')}")
        runs[t] = run(dataclasses.replace(cfg, out=os.path.join(cfg.out, f"T{t:g}"),
                                          decoding=dataclasses.replace(cfg.decoding, temperature=t)), log)
    tasks, models = [s.name for s in cfg.tasks], [m.name for m in cfg.models]
    by_task = {task: {m: temperature_scan(lambda t, task=task, m=m: runs[t]["results"][task][m], temps,
                                          lambda r, task=task: scan_score(task, r)) for m in models}
               for task in tasks}
    tests = wilcoxon_tests(by_task, models)
    result = {"temperatures": temps, "models": models, "tasks": {t: score_name(t) for t in tasks},
              "scores": by_task, "wilcoxon": tests, "runs": {f"{t:g}": f"T{t:g}" for t in temps},
              "decoding": {k: v for k, v in dataclasses.asdict(cfg.decoding).items() if k != "temperature"}}
    write_text_atomic(os.path.join(cfg.out, "scan.json"), json.dumps(result, indent=2) + "\n")
    write_scan_report(cfg.out, result)
    return result


def wilcoxon_tests(by_task: dict[str, dict[str, dict[str, Any]]], models: Sequence[str]) -> dict[str, Any]:
    """One-sided Wilcoxon tests of ``models[0]`` > each other model over the scan: per task, and "overall" (every
    task's pairs on one scale, percent, so that no task's differences swamp another's) when there are several."""
    def pooled(model: str) -> np.ndarray:
        return np.concatenate([np.asarray(s[model]["scores"]) * _percent(task) for task, s in by_task.items()])

    tests = {}
    for other in models[1:]:
        key = f"{models[0]} > {other}"
        tests[key] = {task: wilcoxon_greater(s[models[0]]["scores"], s[other]["scores"])
                      for task, s in by_task.items()}
        if len(by_task) > 1:
            tests[key]["overall"] = wilcoxon_greater(pooled(models[0]), pooled(other))
    return tests


def write_scan_report(out: str, scan: dict[str, Any]) -> str:
    """``OUT/scan.md`` (scores per temperature, highest / median, the tests) and ``OUT/scan.png``."""
    temps, models = scan["temperatures"], scan["models"]
    lines = ["# Temperature scan", "",
             f"Temperatures {', '.join(f'{t:g}' for t in temps)}; each is a run folder (`T<t>/`) with its own "
             "predictions, metrics.json and report.md. Score: ROUGE-1 (RT regimen), accuracy (RT modality, ICD-10), "
             "Average F1 in percent (CancerLLM tasks).", ""]
    for task, score in scan["tasks"].items():
        lines += [f"## {task} ({score})", "", "| Model | " + " | ".join(f"T={t:g}" for t in temps)
                  + " | highest | median |", "|---|" + "---:|" * (len(temps) + 2)]
        for m in models:
            s = scan["scores"][task][m]
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in s["scores"])
                         + f" | {s['max']:.3f} | {s['median']:.3f} |")
        lines.append("")
    if scan["wilcoxon"]:
        lines += ["## One-sided Wilcoxon signed-rank tests (Table 1-shaped)", "",
                  "| Test | Task | highest (median) of each | p-value | n | significant (α = 0.05) |",
                  "|---|---|---|---:|---:|---|"]
        for key, per_task in scan["wilcoxon"].items():
            a, b = key.split(" > ")
            for task, r in per_task.items():
                hm = "-" if task == "overall" else " vs ".join(
                    f"{scan['scores'][task][m]['max']:.3f} ({scan['scores'][task][m]['median']:.3f})"
                    for m in (a, b))
                lines.append(f"| {key} | {task} | {hm} | {r['p_value']:.4g} | {r['n']} | "
                             f"{'yes' if r['significant'] else 'no'} |")
        lines.append("")
    lines += ["![scores per temperature](scan.png)", ""]
    _plot(out, scan)
    path = os.path.join(out, "scan.md")
    write_text_atomic(path, "\n".join(lines))
    return path


def _plot(out: str, scan: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(scan["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks) + 1.5, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in scan["models"]:
            ax.plot(scan["temperatures"], scan["scores"][task][m]["scores"], marker="o", label=m)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("temperature")
        ax.set_ylabel(scan["tasks"][task])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    tmp = os.path.join(out, ".scan.png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, os.path.join(out, "scan.png"))
