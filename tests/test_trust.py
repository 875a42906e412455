"""BenchHealth trust metrics by hand, and k-shot prompts that never contain the example itself."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from cancerllm_jax.data.instruct import render_prompt
from cancerllm_jax.eval.trust import draw_exemplars, entry_from_score, few_shot_prompt, trust_metrics


def test_trust_metrics_by_hand():
    results = {
        "summarization": {"iu_xray": {"precision": 40.0, "recall": 30.0, "matching": {"rougeL": 30.0, "bleu": 10.0}},
                          "mimic_cxr": {"precision": 20.0, "recall": 50.0, "matching": {"rougeL": 20.0, "bleu": 0.0}}},
        "ner": {"bc5": {"precision": 70.0, "recall": 60.0, "matching": 64.0}},
    }
    m = trust_metrics(results)
    assert m["faithfulness"] == pytest.approx((40 + 20) / 2 + 70)  # per-task mean precision, summed over tasks
    assert m["comprehensiveness"] == pytest.approx((30 + 50) / 2 + 60)
    assert m["generalizability"] == pytest.approx((30 + 10 + 20 + 0 + 64) / 5)
    # summarization dataset scores 20 and 10 → population variance 25; ner has one dataset → no variance
    assert m["robustness_per_task"] == {"summarization": pytest.approx(25.0)}
    assert m["robustness"] == pytest.approx(25.0)
    # a task counts with all its datasets or not at all; NaN scores are refused
    del results["summarization"]["mimic_cxr"]["precision"]
    with pytest.raises(ValueError, match="mimic_cxr have no 'precision'"):
        trust_metrics(results)
    results["summarization"]["mimic_cxr"]["precision"] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        trust_metrics(results)


def test_entry_from_score():
    s = {"em_p": 10, "em_r": 20, "em_f1": 15, "bleu2_p": 40, "bleu2_r": 50, "bleu2_f1": 45,
         "rougeL_p": 70, "rougeL_r": 80, "rougeL_f1": 75, "avg_f1": 45}
    e = entry_from_score(s)
    assert e["precision"] == pytest.approx(40) and e["recall"] == pytest.approx(50)
    assert e["matching"] == {"em_f1": 15, "bleu2_f1": 45, "rougeL_f1": 75}


def _train(n=8):
    return [{"id": f"t{i}", "instruction": "Give the diagnosis.", "context": f"note {i}", "response": f"dx {i}"}
            for i in range(n)]


def test_zero_shot_is_the_generation_prompt():
    ex = {"id": "q", "instruction": "Give the diagnosis.", "context": "query note", "response": "dx q"}
    assert few_shot_prompt(ex, _train(), 0) == render_prompt(ex["instruction"], ex["context"], for_generation=True)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_shot_never_includes_the_example(k):
    train = _train(6)
    for ex in train:  # the example is itself in the training split: it must never be an exemplar
        shots = draw_exemplars(ex, train, k, seed=0)
        assert len(shots) == k and ex not in shots and len({s["id"] for s in shots}) == k
        prompt = few_shot_prompt(ex, train, k, seed=0)
        assert prompt.count("### Instruction:") == k + 1
        assert f"note {ex['id'][1:]}\n" in prompt and ex["response"] not in prompt
        assert prompt.endswith(render_prompt(ex["instruction"], ex["context"], for_generation=True))
        assert all(f"### Response:\n{s['response']}" in prompt for s in shots)


def test_k_shot_is_seeded():
    ex = {"id": "q", "instruction": "i", "context": "c", "response": "r"}
    assert draw_exemplars(ex, _train(), 3, seed=1) == draw_exemplars(ex, _train(), 3, seed=1)
    assert any(draw_exemplars(ex, _train(), 3, seed=1) != draw_exemplars(ex, _train(), 3, seed=s) for s in range(2, 6))
    with pytest.raises(ValueError):
        draw_exemplars(_train(3)[0], _train(3), 3, seed=0)


@pytest.mark.parametrize("metrics, message", [
    ([1], "no scores under 'results'"),
    ({"results": {}}, "no scores under 'results'"),  # used to print an empty table and exit 0
    ({"results": {"diagnosis": {"m": {}}}}, r"results\['diagnosis'\]\['m'\]: missing or non-numeric em_p"),
    ({"results": {"diagnosis": {"m": {k: "1" for k in ("em_p", "em_r", "em_f1", "bleu2_p", "bleu2_r", "bleu2_f1",
                                                         "rougeL_p", "rougeL_r", "rougeL_f1")}}}},
     "non-numeric em_p"),
])
def test_trust_cli_names_a_bad_metrics_file(tmp_path, capsys, metrics, message):
    """A metrics.json without usable scores is one error naming the file (it was a KeyError "bug")."""
    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parents[1] / "launch" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["trust", "--run", f"d={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(re.escape(str(tmp_path / "metrics.json")) + ": .*" + message, err), err


def test_trust_never_reports_an_unmeasured_robustness_and_scores_radonc_tasks_by_their_metrics():
    """No task on two datasets: robustness None (was 0.00, the best score); a radiation-oncology task's entry is its
    own accuracy / P / R / F1 (was the EM / BLEU-2 / ROUGE-L of free text, 0 for 'IMRT 50 Gy' against 'photon')."""
    scores = {k: 10.0 for k in ("em_p", "em_r", "em_f1", "bleu2_p", "bleu2_r", "bleu2_f1", "rougeL_p", "rougeL_r",
                                "rougeL_f1")}
    assert trust_metrics({"diagnosis": {"a": entry_from_score(scores)}})["robustness"] is None
    modality = {**scores, "radonc": {"accuracy": 1.0, "precision": 0.9, "recall": 0.8, "f1": 0.85}}
    assert entry_from_score(modality) == {"precision": pytest.approx(90), "recall": pytest.approx(80),
                                          "matching": {"accuracy": 100.0, "f1": pytest.approx(85)}}
    regimen = {**scores, "radonc": {"rouge1": 0.5, "rouge1_precision": 0.25, "rouge1_f": 0.3, "per_instance": []}}
    assert entry_from_score(regimen) == {"precision": 25.0, "recall": 50.0, "matching": {"rouge1": 50.0}}
    broken = {**scores, "radonc": {"error": "ValueError: ..."}}
    assert entry_from_score(broken) == entry_from_score(scores)  # not known to be a radiation-oncology task
    for task, result in (("radonc_modality", broken), ("radonc_icd10", scores)):  # never EM / BLEU / ROUGE instead
        with pytest.raises(ValueError, match=r"(scorer failed \(ValueError: ...\)|holds no radiation-oncology "
                                             r"scores); a radiation-oncology task counts only with its own metrics"):
            entry_from_score(result, task)
    assert entry_from_score(modality, "radonc_modality")["matching"] == {"accuracy": 100.0, "f1": pytest.approx(85)}
    legacy = {**scores, "radonc": {"rouge1": 0.5, "per_instance": []}}  # before rouge1_precision was recorded
    with pytest.raises(ValueError, match="no numeric rouge1_precision; re-score the run with `evaluate.py report"):
        entry_from_score(legacy)


def test_trust_cli_shows_coverage_and_no_made_up_robustness(tmp_path, capsys, caplog):
    scores = {k: 10.0 for k in ("em_p", "em_r", "em_f1", "bleu2_p", "bleu2_r", "bleu2_f1", "rougeL_p", "rougeL_r",
                                "rougeL_f1")}
    runs = {"d1": {"a": ["diagnosis", "phenotype"], "c": ["phenotype"]}, "d2": {"a": ["diagnosis"]}}
    for name, models in runs.items():
        results = {}
        for model, tasks in models.items():
            for task in tasks:
                results.setdefault(task, {})[model] = scores
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"results": results}))
    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parents[1] / "launch" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    assert evaluate.main(["trust", "--run", f"d1={tmp_path / 'd1'}", "--run", f"d2={tmp_path / 'd2'}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nc +10\.00 +10\.00 +10\.00 +- +1 +1\n", out), out
    assert re.search(r"\na +20\.00 +20\.00 +10\.00 +0\.00 +2 +3\n", out), out
    assert "scored on different tasks or datasets (a: 2 tasks, 3 task datasets; c: 1 tasks" in caplog.text


def test_trust_over_runs_refuses_mixed_models_or_protocols():
    """One name must stand for the same weights in every run, and the runs must share a protocol: else the trust
    metrics would average two models, or two scorers, as one."""
    from cancerllm_jax.eval.trust import trust_from_runs

    scores = {k: 50.0 for k in ("em_p", "em_r", "em_f1", "bleu2_p", "bleu2_r", "bleu2_f1", "rougeL_p", "rougeL_r",
                                "rougeL_f1")}
    model = {"path": "/m/tuned", "checkpoint_step": 10, "weights": "abc"}

    def run(protocol="standard", **made):
        return {"protocol": protocol, "models": {"tuned": {**model, **made}},
                "results": {"diagnosis": {"tuned": scores}}}

    legacy = run()
    assert trust_from_runs({"a": run(tokenizer_sha256="f"), "b": legacy})["tuned"]["n_datasets"] == 2
    for other, message in ((run(weights="def"), "other weights"), (run(adapter={"weights": "x"}), "other adapter"),
                           (run(protocol="reference"), "a: standard, b: reference")):
        with pytest.raises(ValueError, match=message):
            trust_from_runs({"a": legacy, "b": other})
