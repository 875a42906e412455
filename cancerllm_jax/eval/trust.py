"""BenchHealth's trust metrics (seed 004) and k-shot Alpaca prompts.

``per_dataset_results`` is one model's ``{task: {dataset: entry}}`` where an entry holds ``precision``,
``recall`` and ``matching`` (one matching score, or a mapping of matching metrics such as EM/BLEU/ROUGE F1);
:func:`entry_from_score` builds an entry from :func:`cancerllm_jax.eval.score`'s output. Following the paper:

- **faithfulness** = the *sum over tasks* of the precision (nothing invented). A task evaluated on several
  datasets contributes the mean of its datasets' precisions (our reading: BenchHealth sums "the precision scores
  of tasks"; averaging within a task keeps a task with more datasets from weighing more);
- **comprehensiveness** = the same sum with recall (nothing left out);
- **generalizability** = the plain mean of *all* matching scores, over every metric, dataset and task;
- **robustness** = per task with at least two datasets, the (population, ``ddof=0``) variance of the model's
  score across those datasets, and their sum over tasks (lower is better). A dataset's score is the mean of its
  matching scores. Tasks with a single dataset have no variance and are left out; a model with no task on two
  datasets has no robustness (``None``), never a perfect 0.

A radiation-oncology task (seed 003) is scored with its own metrics: precision and recall are the modality's
weighted / the ICD-10 category's macro ones, matching its accuracy and F1; the regimen's are ROUGE-1 precision,
recall and (matching) the paper's ROUGE-1 recall.

Use one scale throughout (CancerLLM's scorer gives percent). No jax.
"""
from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SHOTS = (0, 1, 3, 5)
SCORE_KEYS = tuple(f"{m}_{x}" for m in ("em", "bleu2", "rougeL") for x in ("p", "r", "f1"))  # what a run must hold
_REGIMEN_KEYS, _CLASSIFICATION_KEYS = ("rouge1", "rouge1_precision"), ("accuracy", "precision", "recall", "f1")


def _matching(entry: Mapping[str, Any]) -> list[float]:
    m = entry["matching"]
    return [float(v) for v in m.values()] if isinstance(m, Mapping) else [float(m)]


def entry_from_score(result: Mapping[str, Any], task: str | None = None) -> dict[str, Any]:
    """A trust entry from a CancerLLM score dict: precision / recall = mean of the EM, BLEU-2 and ROUGE-L
    precisions / recalls; matching = the three F1s. A result with ``radonc`` metrics (``evaluate.py run`` on a
    radiation-oncology task) is scored with those instead (see the module doc), in percent; a radiation-oncology
    ``task`` without them (its scorer failed, or an older version wrote the run) is a ``ValueError``, never scored
    with the EM / BLEU / ROUGE figures in their place."""
    from cancerllm_jax.eval.tasks import TASKS

    extra = result.get("radonc")
    if task in TASKS and TASKS[task].kind == "radonc" and not (isinstance(extra, Mapping) and "error" not in extra):
        why = (f"its radiation-oncology scorer failed ({extra['error']})" if isinstance(extra, Mapping) else
               "it holds no radiation-oncology scores")
        raise ValueError(f"{why}; a radiation-oncology task counts only with its own metrics: re-score the run with "
                         "`evaluate.py report --out DIR`")
    if isinstance(extra, Mapping) and "error" not in extra:
        needed = _REGIMEN_KEYS if "rouge1" in extra else _CLASSIFICATION_KEYS
        missing = [k for k in needed if isinstance(extra.get(k), bool)
                   or not isinstance(extra.get(k), (int, float))]
        if missing:  # written by an earlier version
            raise ValueError(f"its radiation-oncology scores have no numeric {', '.join(missing)}; re-score the run "
                             "with `evaluate.py report --out DIR`")
        if "rouge1" in extra:  # the regimen: the paper's ROUGE-1 is the recall
            return {"precision": 100 * float(extra["rouge1_precision"]), "recall": 100 * float(extra["rouge1"]),
                    "matching": {"rouge1": 100 * float(extra["rouge1"])}}
        return {"precision": 100 * float(extra["precision"]), "recall": 100 * float(extra["recall"]),
                "matching": {"accuracy": 100 * float(extra["accuracy"]), "f1": 100 * float(extra["f1"])}}
    metrics = ("em", "bleu2", "rougeL")
    return {"precision": float(np.mean([result[f"{m}_p"] for m in metrics])),
            "recall": float(np.mean([result[f"{m}_r"] for m in metrics])),
            "matching": {f"{m}_f1": float(result[f"{m}_f1"]) for m in metrics}}


def trust_metrics(per_dataset_results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Faithfulness, comprehensiveness, generalizability and robustness of one model (see the module doc)."""
    if not per_dataset_results or not all(per_dataset_results.values()):
        raise ValueError("per_dataset_results must map each task to at least one dataset entry")
    faith = comp = 0.0
    matching: list[float] = []
    variances: dict[str, float] = {}
    for task, datasets in per_dataset_results.items():
        entries = list(datasets.values())
        for key in ("precision", "recall"):
            missing = [name for name, e in datasets.items() if key not in e]
            if missing and len(missing) < len(entries):  # a task counts with all its datasets or not at all
                raise ValueError(f"task {task!r}: dataset(s) {', '.join(map(str, missing))} have no {key!r} but "
                                 f"others do; give every dataset of a task the same fields")
        values = [float(e[k]) for e in entries for k in ("precision", "recall") if k in e] + [
            v for e in entries for v in _matching(e)]
        if not np.all(np.isfinite(values)):
            raise ValueError(f"task {task!r}: a score is NaN or infinite")
        if all("precision" in e for e in entries):
            faith += float(np.mean([e["precision"] for e in entries]))
        if all("recall" in e for e in entries):
            comp += float(np.mean([e["recall"] for e in entries]))
        matching += [v for e in entries for v in _matching(e)]
        if len(entries) >= 2:
            variances[task] = float(np.var([np.mean(_matching(e)) for e in entries]))
    return {"faithfulness": faith, "comprehensiveness": comp, "generalizability": float(np.mean(matching)),
            "robustness": float(sum(variances.values())) if variances else None, "robustness_per_task": variances,
            "n_tasks": len(per_dataset_results), "n_datasets": sum(len(d) for d in per_dataset_results.values())}


def check_run(metrics: Any) -> None:
    """Raise ``ValueError`` saying what is missing when ``metrics`` (a run's ``metrics.json``) has no scores to use:
    ``results`` must map tasks to models to numeric ``em_p`` … ``rougeL_f1``."""
    results = metrics.get("results") if isinstance(metrics, Mapping) else None
    if not isinstance(results, Mapping) or not any(isinstance(v, Mapping) and v for v in results.values()):
        raise ValueError("no scores under 'results' (not a finished `evaluate.py run` folder?)")
    for task, by_model in results.items():
        for model, r in (by_model.items() if isinstance(by_model, Mapping) else [("", None)]):
            bad = [k for k in SCORE_KEYS if not isinstance(r, Mapping) or isinstance(r.get(k), bool)
                   or not isinstance(r.get(k), (int, float))]
            if bad:
                raise ValueError(f"results[{task!r}]{f'[{model!r}]' if model else ''}: missing or non-numeric "
                                 f"{', '.join(bad)}")


def trust_from_runs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each model's trust metrics over several evaluation runs, one per dataset: ``runs`` maps a dataset name to
    that run's ``metrics.json`` (as ``evaluate.py run`` writes it). A model is scored on every (task, dataset) its
    runs hold; models or tasks missing from some runs are scored on the rest. Runs scored with other protocols, or
    a name that stands for other weights in another run (``models[name]``: path, weights fingerprint, adapter …),
    are refused: their scores would be mixed as one model's."""
    from cancerllm_jax.eval.runner import _ADDED_KEYS  # absent from runs of earlier versions: not compared

    protocols = {d: m.get("protocol", "standard") for d, m in runs.items()}
    if len(set(protocols.values())) > 1:
        listed = ", ".join(f"{d}: {p}" for d, p in protocols.items())
        raise ValueError(f"the runs were scored with other protocols ({listed}); re-score them with one "
                         "(`evaluate.py report --out DIR --protocol P`)")
    models = sorted({m for metrics in runs.values() for by_model in metrics.get("results", {}).values()
                     for m in by_model})
    seen: dict[str, tuple[str, Mapping]] = {}
    for dataset, metrics in runs.items():
        for model, made in (metrics.get("models") or {}).items():
            if model not in models or not isinstance(made, Mapping):
                continue
            first, old = seen.setdefault(model, (dataset, made))
            keys = [k for k in ("path", "checkpoint_step", "weights", "adapter", "base", "tokenizer_sha256")
                    if old.get(k) != made.get(k) and (k in made and k in old or k not in _ADDED_KEYS)]
            if keys:
                raise ValueError(f"model {model!r} is not the same model in runs {first!r} and {dataset!r} (other "
                                 f"{', '.join(keys)}); give other models other names")
    out = {}
    for model in models:
        per: dict[str, dict[str, Any]] = {}
        for dataset, metrics in runs.items():
            for task, by_model in metrics.get("results", {}).items():
                if model in by_model:
                    try:
                        per.setdefault(task, {})[dataset] = entry_from_score(by_model[model], task)
                    except ValueError as e:
                        raise ValueError(f"run {dataset!r}, {task} / {model}: {e}") from None
        out[model] = trust_metrics(per) | {"coverage": {task: sorted(d) for task, d in per.items()}}
    return out


def trust_warnings(runs: Mapping[str, Mapping[str, Any]], trust: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What makes :func:`trust_from_runs`' figures compare less than they seem: one test set given as two datasets
    (two temperatures of one data), and models scored on other tasks or datasets (the sums run over tasks)."""
    warnings, seen = [], {}
    for name, metrics in runs.items():
        tasks = metrics.get("tasks") if isinstance(metrics.get("tasks"), Mapping) else {}
        for task, spec in tasks.items():
            if metrics.get("data") is None or not isinstance(spec, Mapping) or not spec.get("ids"):
                continue
            same = json.dumps([metrics["data"], task, spec["ids"]])
            if same in seen:
                warnings.append(f"--run {seen[same]} and {name} hold the same {task} test data ({metrics['data']}): "
                                "robustness compares them as two datasets")
            seen.setdefault(same, name)
    if len({json.dumps(m["coverage"], sort_keys=True) for m in trust.values()}) > 1:
        covered = "; ".join(f"{model}: {m['n_tasks']} tasks, {m['n_datasets']} task datasets"
                            for model, m in trust.items())
        warnings.append(f"the models were scored on different tasks or datasets ({covered}): faithfulness and "
                        "comprehensiveness sum over tasks and compare only models with the same coverage")
    return warnings


def _key(record: Mapping[str, Any]) -> tuple:
    return (record.get("instruction"), record.get("context"), record.get("response"))


def draw_exemplars(example: Mapping[str, Any], exemplars: Sequence[Mapping[str, Any]], k: int, seed: int | str
                   ) -> list[Mapping[str, Any]]:
    """``k`` exemplars drawn without replacement (seeded per example), never the example itself (same id or
    same instruction/context/response)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ex_id = example.get("id")
    pool = [e for e in exemplars if not ((ex_id is not None and e.get("id") == ex_id) or _key(e) == _key(example))]
    if k > len(pool):
        raise ValueError(f"asked for {k} exemplars but only {len(pool)} differ from the example")
    rng = random.Random(f"kshot:{seed}:{ex_id if ex_id is not None else _key(example)}")
    return rng.sample(pool, k)


def few_shot_prompt(example: Mapping[str, Any], exemplars: Sequence[Mapping[str, Any]], k: int,
                    seed: int | str = 0) -> str:
    """A k-shot Alpaca prompt: ``k`` complete training examples (prompt + response), a blank line between them,
    then the example's generation prompt. ``k = 0`` is exactly the zero-shot generation prompt."""
    from cancerllm_jax.data.instruct import render_example, render_prompt

    shots = draw_exemplars(example, exemplars, k, seed)
    blocks = [render_example(e["instruction"], e.get("context"), e["response"]) for e in shots]
    blocks.append(render_prompt(example["instruction"], example.get("context"), for_generation=True))
    return "\n\n".join(blocks)
