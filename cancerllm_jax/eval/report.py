"""``report.md`` and PNG plots from a run's ``metrics.json``: per-task score tables shaped like the paper's Tables 2–4,
an efficiency table shaped like Table 7, and bar plots (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Any

from cancerllm_jax.eval.tasks import TASKS

METRIC_ROWS = (("Exact Match", "em"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rougeL"))
PLOTS = {"scores": "scores_avg_f1.png", "metrics": "scores_by_metric.png", "efficiency": "efficiency.png"}
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _mb(n: int | None) -> str:
    return "–" if not n else f"{n / 2**20:,.0f}"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _title(task: str) -> str:
    spec = TASKS.get(task)
    return spec.title if spec else task


def score_table(task: str, by_model: dict[str, dict]) -> list[str]:
    """Rows = models; columns = EM / BLEU-2 / ROUGE-L P, R, F1 and the Average F1 (the paper's Tables 2–4)."""
    head = "| Model | n | " + " | ".join(f"{lab} {x}" for lab, _ in METRIC_ROWS for x in ("P", "R", "F1")) + \
           " | **Avg F1** |"
    lines = [head, "|" + "---|" * 2 + "---:|" * 10]
    shown = [f"{r['avg_f1']:.2f}" for r in by_model.values()]  # the best as printed: a tie there is no win
    best = max(shown, key=float, default=None)
    for model, r in by_model.items():
        cells = [f"{r[f'{k}_{x}']:.2f}" for _, k in METRIC_ROWS for x in ("p", "r", "f1")]
        avg = f"{r['avg_f1']:.2f}"
        if len(by_model) > 1 and avg == best and shown.count(best) == 1:
            avg = f"**{avg}**"
        lines.append(f"| {model} | {r['n']} | " + " | ".join(cells) + f" | {avg} |")
    return lines


def efficiency_table(metrics: dict[str, Any]) -> list[str]:
    """Table 7: per task and model, limits, generation time, tokens, tokens/s, peak memory."""
    lines = ["| Task | Model | max in / new | n | Generation time | Generated tokens | Tokens/s | "
             "Tokens/s (no compile) | Peak memory (MiB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for task, by_model in metrics["results"].items():
        spec = metrics["tasks"].get(task, {})
        for model, r in by_model.items():
            e = r.get("efficiency") or {}
            timed = e.get("instances_decoded") or 0  # timings lost (no stats file) or for other rows: said so
            n = f"{r['n']}" if timed == r["n"] else f"{r['n']} ({timed} timed)"
            lines.append(f"| {_title(task)} | {model} | {spec.get('max_input_tokens', '?')} / "
                         f"{spec.get('max_new_tokens', '?')} | {n} | "
                         f"{hms(e.get('generation_time_s') if timed else None)} | "
                         f"{e.get('generated_tokens', 0):,} | {_num(e.get('tokens_per_s'), '{:.1f}')} | "
                         f"{_num(e.get('steady_tokens_per_s'), '{:.1f}')} | {_mb(e.get('peak_memory_bytes'))} |")
    return lines


def chapter_confusion_table(model: str, radonc: dict[str, Any]) -> list[str]:
    """The ICD-10 main categories' confusion matrix by chapter (rows gold, columns predicted; only the chapters
    either side has) as a Markdown table; nothing when the result has none."""
    labels, cm = radonc.get("chapters"), radonc.get("chapter_confusion")
    if not labels or not cm:
        return []
    lines = [f"Confusion by ICD-10 chapter, {model} (rows gold, columns predicted; instances):", "",
             "| gold \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {label} | " + " | ".join(str(x) for x in row) + " |" for label, row in zip(labels, cm, strict=True)]
    return lines + [""]


def _setup_lines(metrics: dict[str, Any]) -> list[str]:
    d = metrics.get("decoding", {})
    dec = "greedy" if d.get("greedy", True) else (f"sampling: temperature {d.get('temperature')}, top-k "
                                                  f"{d.get('top_k') or 'off'}, top-p {d.get('top_p')}")
    v = metrics.get("versions", {})
    dev = metrics.get("device", {})
    lines = [
        f"- **Created:** {metrics.get('created', '?')}" + (f" (re-scored {metrics['rescored']})"
                                                           if metrics.get("rescored") else ""),
        f"- **Protocol:** `{metrics.get('protocol')}` (see `docs/eval_protocol.md`: comma-split answers, normalised "
        "and Porter-stemmed, soft set matching; scores are percentages"
        + ("; as the published evaluator, the ROUGE-L columns hold its unigram-set F-measure (β = 1.2) and BLEU-2 "
           "is COCO-style)" if metrics.get("protocol") == "reference" else ")"),
        f"- **Data:** {metrics.get('data')}" + (f", first {metrics['limit']} test instances per task"
                                                if metrics.get("limit") else ""),
        f"- **Decoding:** {dec}; {d.get('shots') or 0}-shot prompts; seed {d.get('seed')}; "
        f"batch size {d.get('batch_size')}; "
        f"weights in {metrics.get('dtype')}, mesh {metrics.get('mesh')}",
        f"- **Device:** {dev.get('platform', '?')} ({dev.get('device_kind', '?')}, {dev.get('count', '?')} device(s), "
        f"{dev.get('host_cpus', '?')} host CPUs)",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- **Models:**",
    ]
    for name, m in metrics.get("models", {}).items():
        extra = f", {m['params_m']:.0f}M parameters" if m.get("params_m") else ""
        a = m.get("adapter")
        adapter = f" + adapter `{a.get('path') if isinstance(a, dict) else a}`" if a else ""
        lines.append(f"  - `{name}`: `{m.get('path')}`{adapter}{extra}" +
                     (f", loaded in {m['load_time_s']:.1f} s" if m.get("load_time_s") is not None else ""))
    if metrics.get("notes"):
        lines.append("- **Notes:**")
        lines += [f"  - {n}" for n in metrics["notes"]]
    return lines


def write_report(out: str, metrics: dict[str, Any], title: str | None = None) -> str:
    """Write ``OUT/report.md`` and the PNGs; returns the report path."""
    plots = write_plots(out, metrics)
    results = metrics.get("results", {})
    lines = [f"# {title or metrics.get('title') or 'CancerLLM evaluation'}", ""]
    # headline: Avg F1 per task and model
    models = list(metrics.get("models", {}))
    lines += ["## Summary: Average F1 (mean of the EM, BLEU-2 and ROUGE-L F1s)", "",
              "| Task | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for task, by_model in results.items():
        lines.append(f"| {_title(task)} | " + " | ".join(_num(by_model.get(m, {}).get("avg_f1")) for m in models)
                     + " |")
    lines += [""]
    if "scores" in plots:
        lines += [f"![Average F1 per task and model]({plots['scores']})", ""]
    lines += ["## Setup", ""] + _setup_lines(metrics) + [""]
    for task, by_model in results.items():
        spec = metrics["tasks"].get(task, {})
        lines += [f"## {_title(task)} ({spec.get('paper_table', '')}-shaped)", "",
                  f"Limits: {spec.get('max_input_tokens')} prompt tokens / {spec.get('max_new_tokens')} new tokens. "
                  f"Precision / recall / F1 in percent.", ""]
        lines += score_table(task, by_model) + [""]
        empties = {m: r.get("empty_predictions", 0) for m, r in by_model.items() if r.get("empty_predictions")}
        if empties:
            lines += ["Empty predictions: " + ", ".join(f"{m}: {k}" for m, k in empties.items()), ""]
        for key, what in (("prompts_cut", "Contexts cut to fit the prompt budget (instances)"),
                          ("prompts_with_fewer_shots", "Prompts with fewer exemplars than asked (more did not fit)")):
            counts = {m: (r.get("efficiency") or {}).get(key) for m, r in by_model.items()}
            if any(counts.values()):
                lines += [f"{what}: " + ", ".join(f"{m}: {k}" for m, k in counts.items() if k), ""]
        radonc = {m: r["radonc"] for m, r in by_model.items() if r.get("radonc")}
        if radonc:
            keys = sorted({k for v in radonc.values() for k, x in v.items() if isinstance(x, (int, float, str))})
            lines += ["Task-specific metrics (`eval/radonc.py`; fractions from 0 to 1, not percent):", "",
                      "| Model | " + " | ".join(keys) + " |",
                      "|---|" + "---:|" * len(keys)]
            for m, v in radonc.items():
                lines.append(f"| {m} | " + " | ".join(
                    (f"{v[k]:.4g}" if isinstance(v.get(k), float) else str(v.get(k, "–"))) for k in keys) + " |")
            lines += [""]
            if task == "radonc_icd10":
                for m, v in radonc.items():
                    lines += chapter_confusion_table(m, v)
                lines += [f"![ICD-10 confusion by the paper's groups, {m}]({plots[f'icd10:{m}']})"
                          for m in radonc if f"icd10:{m}" in plots] + [""]
    if "metrics" in plots:
        lines += [f"![EM, BLEU-2 and ROUGE-L F1 per task]({plots['metrics']})", ""]
    lines += ["## Efficiency (Table 7-shaped)", "",
              "Generation time is the wall time of all decoding batches of the test split (prompt encoding, prefill "
              "and decoding; batches that compiled a new shape included — the last tokens/s column leaves them out). "
              "Peak memory is the JAX device's `peak_bytes_in_use` on an accelerator, a process-wide high-water "
              "mark (a task or model decoded after another in one run reads at least the other's peak: for each "
              "one's own, run one `evaluate.py run` per model and task into the same `--out`, which resumes), and "
              "on a CPU host the peak RSS during that task's decoding. For scale: the paper's Table 7 (4-bit 7B model, "
              "batch 1, one A100) reports 1:14:12 for phenotypes, 1:26:33 for diagnosis and 11:40:14 for treatment "
              "plans, and 5,550 MB (its unit; our memory column is MiB, 2^20 bytes).", ""]
    lines += efficiency_table(metrics) + [""]
    if "efficiency" in plots:
        lines += [f"![Generation time and throughput]({plots['efficiency']})", ""]
    lines += ["## Files", "",
              "- `metrics.json`: everything above, machine-readable.",
              "- `predictions/<model>__<task>.jsonl`: `{id, prompt_hash, gold, prediction}` per instance; re-score "
              "without decoding: `python launch/evaluate.py report --out DIR [--protocol reference]`, or one file: "
              "`python launch/evaluate.py score --pred FILE`.", ""]
    from cancerllm_jax.train.run_io import write_text_atomic

    path = os.path.join(out, "report.md")
    write_text_atomic(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------- plots


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
    """Save ``fig`` as a PNG beside ``path`` and rename it there: the file appears complete or not at all."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, fmt: str = "{:.1f}",
             ylim: float | None = None) -> None:
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    top = max([v for vals in series.values() for v in vals if v is not None] + [1e-9])
    for i, (name, vals) in enumerate(series.items()):
        xs = x + (i - (n - 1) / 2) * width
        hs = [v or 0.0 for v in vals]
        bars = ax.bar(xs, hs, width * 0.92, label=name, color=_COLORS[i % len(_COLORS)])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate("–" if v is None else fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ylim if ylim is not None else top * 1.18)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def write_plots(out: str, metrics: dict[str, Any]) -> dict[str, str]:
    """Bar plots of Avg F1, of the three metric F1s per task, and of time / tokens/s; returns name → file."""
    results = metrics.get("results", {})
    if not results:
        return {}
    plt = _plt()
    models = list(metrics.get("models", {}))
    tasks = list(results)
    short = {"phenotype": "Phenotypes", "diagnosis": "Diagnosis", "treatment_plan": "Treatment plan",
             "radonc_regimen": "RT regimen", "radonc_modality": "RT modality", "radonc_icd10": "ICD-10"}
    titles = [short.get(t, t) for t in tasks]
    files = {}

    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(tasks) + 1.5), 3.6))
    series = {m: [results[t].get(m, {}).get("avg_f1") for t in tasks] for m in models}
    top = max([v for vals in series.values() for v in vals if v is not None] + [1.0])
    _grouped(ax, titles, series, "Average F1 (%)", ylim=min(100.0, top * 1.2) if top > 0 else 1)
    ax.set_title("Average F1 (mean of EM, BLEU-2, ROUGE-L F1) per task", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    files["scores"] = PLOTS["scores"]
    save_figure(fig, os.path.join(out, PLOTS["scores"]))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks) + 1.2, 3.4), squeeze=False)
    top = max([results[t][m][f"{k}_f1"] for t in tasks for m in results[t] for _, k in METRIC_ROWS] + [1.0])
    for ax, task, title in zip(axes[0], tasks, titles, strict=True):
        series = {m: [results[task].get(m, {}).get(f"{k}_f1") for _, k in METRIC_ROWS] for m in models}
        _grouped(ax, ["EM", "BLEU-2", "ROUGE-L"], series, "F1 (%)" if ax is axes[0][0] else "",
                 ylim=min(100.0, top * 1.2))
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"F1 per metric, protocol {metrics.get('protocol', 'standard')}", fontsize=10)
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    files["metrics"] = PLOTS["metrics"]
    save_figure(fig, os.path.join(out, PLOTS["metrics"]))
    plt.close(fig)

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(max(11.0, 4.2 * len(tasks) + 2.5), 3.5))
    eff = {m: [results[t].get(m, {}).get("efficiency", {}) for t in tasks] for m in models}
    times = {m: [e.get("generation_time_s") for e in es] for m, es in eff.items()}
    tmax = max([v for vals in times.values() for v in vals if v is not None] + [1.0])
    unit, div = ("min", 60.0) if tmax >= 180 else ("s", 1.0)
    _grouped(a1, titles, {m: [None if v is None else v / div for v in vals] for m, vals in times.items()},
             f"generation time ({unit})")
    a1.set_title("Wall time for the test split", fontsize=10)
    _grouped(a2, titles, {m: [e.get("tokens_per_s") for e in es] for m, es in eff.items()}, "generated tokens / s")
    a2.set_title("Throughput", fontsize=10)
    _grouped(a3, titles, {m: [None if not e.get("peak_memory_bytes") else e["peak_memory_bytes"] / 2**20 for e in es]
                          for m, es in eff.items()}, "peak memory (MiB)", fmt="{:,.0f}")
    kind = next((e.get("memory_kind") for es in eff.values() for e in es if e.get("memory_kind")), "")
    a3.set_title("Peak memory" + (" (host RSS)" if "RSS" in (kind or "") else " (device)"), fontsize=10)
    a3.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    files["efficiency"] = PLOTS["efficiency"]
    save_figure(fig, os.path.join(out, PLOTS["efficiency"]))
    plt.close(fig)

    from cancerllm_jax.eval.radonc import plot_chapter_confusion

    for model, r in results.get("radonc_icd10", {}).items():
        if (r.get("radonc") or {}).get("group_confusion"):
            name = f"icd10_groups_{model}.png"
            plot_chapter_confusion(r["radonc"], os.path.join(out, name), f"ICD-10 codes by group: {model}", "group")
            files[f"icd10:{model}"] = name
    return files
