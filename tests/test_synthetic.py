"""The synthetic data generator: determinism, patient-level splits, held-out test phrasings, answers from context."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cancerllm_jax.data import synthetic as syn
from cancerllm_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 300


@pytest.fixture(scope="module")
def data():
    return syn.instruction_datasets(N, seed=7)


def _all(data, task):
    return [r for s in syn.SPLITS for r in data[task][s]]


def test_same_seed_same_bytes_and_other_seed_differs():
    a = json.dumps(syn.instruction_datasets(40, seed=3)) + json.dumps(syn.pretrain_documents(30, seed=3))
    b = json.dumps(syn.instruction_datasets(40, seed=3)) + json.dumps(syn.pretrain_documents(30, seed=3))
    c = json.dumps(syn.instruction_datasets(40, seed=4))
    assert a == b
    assert a[:len(c)] != c


def test_tasks_splits_and_schema(data):
    assert set(data) == set(syn.TASKS)
    for task in syn.TASKS:
        assert set(data[task]) == set(syn.SPLITS)
        for rec in _all(data, task):
            for key in ("id", "patient_id", "instruction", "context", "response", "cancer_type", "answer_type",
                        "templates", "split", "task"):
                assert key in rec, (task, key)
            assert rec["instruction"] == syn.INSTRUCTIONS[task]
            assert rec["context"].strip() and rec["response"].strip()
    ids = [r["id"] for t in syn.TASKS for r in _all(data, t)]
    assert len(ids) == len(set(ids))


def test_splits_never_share_a_patient_and_are_80_10_10(data):
    for task in syn.TASKS:
        pats = {s: {r["patient_id"] for r in data[task][s]} for s in syn.SPLITS}
        assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
    pats = {s: {r["patient_id"] for r in data["diagnosis"][s]} for s in syn.SPLITS}
    assert [len(pats[s]) for s in syn.SPLITS] == [240, 30, 30]
    n = {s: len(data["phenotype"][s]) for s in syn.SPLITS}
    assert 0.7 < n["train"] / sum(n.values()) < 0.9


def test_all_17_cancer_types_appear(data):
    assert len(syn.CANCERS) == 17
    assert {r["cancer_type"] for r in _all(data, "diagnosis")} == {c.key for c in syn.CANCERS}


def test_phenotype_answers_are_not_relevant_or_read_from_context(data):
    recs = _all(data, "phenotype")
    assert {r["entity_type"] for r in recs} == set(syn.ENTITY_TYPES)
    n_nr = 0
    for r in recs:
        if r["response"] == syn.NOT_RELEVANT:
            n_nr += 1
            continue
        for answer in r["response"].split(", "):
            assert answer.lower() in r["sentence"].lower(), (answer, r["sentence"])
        assert r["sentence"].rstrip(".") in r["context"] and r["question"][1:] in r["context"]
    assert 0.1 < n_nr / len(recs) < 0.5
    assert any("," in r["response"] and r["entity_type"] == "receptor_type" for r in recs)


def test_test_split_uses_held_out_phrasings(data):
    for task in syn.TASKS:
        train_ids = {t for r in data[task]["train"] + data[task]["val"] for t in r["templates"]}
        test_ids = {t for r in data[task]["test"] for t in r["templates"]}
        assert not any("#t" in t for t in train_ids), task
        assert not any("#s" in t for t in test_ids), task
        assert any("#t" in t for t in test_ids), task
    first_lines = lambda split: {r["context"].split(":")[0] for r in data["diagnosis"][split]}  # noqa: E731
    assert not first_lines("train") & first_lines("test")


def test_diagnosis_plan_and_radonc_content(data):
    for r in _all(data, "diagnosis"):
        assert "," not in r["response"] and r["response"] == r["response"].lower()
        if r["answer_type"] == "metastatic":
            assert r["response"].startswith("metastatic ") and r["response"].endswith(" mets")
    for r in _all(data, "treatment_plan"):
        lines = r["response"].split("\n")
        assert [ln.split(".")[0] for ln in lines] == [str(i) for i in range(1, len(lines) + 1)]
    for r in _all(data, "radonc_regimen"):
        assert r["response"].startswith("plan ") and f"fractions:{r['fractions']}" in r["response"]
    mods = {r["response"] for r in _all(data, "radonc_modality")}
    assert mods <= {"photon", "proton", "electron", "brachy"} and len(mods) >= 3
    for r in _all(data, "radonc_icd10"):
        assert r["response"][0] == "C" and r["response"].startswith(r["icd10_category"])


def test_pretrain_documents_mix_length_and_speed():
    t0 = time.perf_counter()
    docs = syn.pretrain_documents(1000, seed=1)
    assert time.perf_counter() - t0 < 2.0  # generous for slow CI; typically ~0.4 s
    sources = [d["source"] for d in docs]
    n_path = sources.count("pathology_report")
    assert sources.count("clinical_note") + n_path == 1000 and 100 < n_path < 250
    lengths = [len(d["text"]) for d in docs]
    assert min(lengths) > 200 and max(lengths) < 2600


def test_module_does_not_import_jax():
    code = "import sys, cancerllm_jax.data.synthetic; assert 'jax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0


def test_write_dataset_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "d"
    counts = syn.write_dataset(str(out), 20, seed=0, n_pretrain_docs=10)
    assert counts["diagnosis"] == {"train": 16, "val": 2, "test": 2}
    assert (out / "DATA.md").exists() and (out / "pretrain" / "corpus.jsonl").exists()
    with pytest.raises(UserError):
        syn.write_dataset(str(out), 20, seed=0, n_pretrain_docs=10)
    syn.write_dataset(str(out), 20, seed=1, n_pretrain_docs=10, overwrite=True)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_cli_writes_files_and_datasheet(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "tools/make_synthetic_data.py", "--out", str(out), "--seed", "2", "--size", "30"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    sheet = (out / "DATA.md").read_text()
    for word in ("train", "val", "test", "breast", "not_relevant", "photon"):
        assert word in sheet
    for task in syn.TASKS:
        rows = [json.loads(x) for x in (out / task / "test.jsonl").read_text().splitlines()]
        assert rows and all(r["split"] == "test" for r in rows)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = subprocess.run(cmd[:-1] + ["3"] + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--size" in bad.stderr
