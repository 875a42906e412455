"""The synthetic data generator: determinism, patient-level splits, held-out test phrasings, answers from context."""
from __future__ import annotations

import json
import re
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
            assert answer in r["sentence"] and answer in r["context"], (answer, r["sentence"])  # spelled as there
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
    assert time.perf_counter() - t0 < 4.0  # generous for a slow, shared CI host; typically ~0.4 s
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


def test_write_dataset_refuses_an_empty_folder_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '' once wrote the task files into the current folder, then failed on DATA.md
    with pytest.raises(UserError, match="empty"):
        syn.write_dataset("", 10, n_pretrain_docs=1)
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="n_pretrain_docs must be at least 1"):  # wrote an empty corpus
        syn.write_dataset(str(tmp_path / "out"), 10, n_pretrain_docs=0)
    assert os.listdir(tmp_path) == []


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


# ------------------------------------------------------------------------------------------------------------------
# Medical consistency: every record agrees with its patient's case (redrawn from (seed, patient id))
# ------------------------------------------------------------------------------------------------------------------

SEED = 7
BONES = ("vertebral body", "femur", "iliac bone", "humerus")
NO_BONE_METS = ("without evidence of osseous", "no suspicious bony", "skeleton free")


@pytest.fixture(scope="module")
def docs():
    return syn.pretrain_documents(600, seed=SEED)


def _case(rec):
    return syn.draw_case(rec["patient_id"], SEED)


def _pathology_reports(docs):
    """(case, text) of every pathology report in the pretraining corpus (document i is patient U<i>)."""
    return [(syn.draw_case(f"U{i:07d}", SEED), d["text"]) for i, d in enumerate(docs)
            if d["source"] == "pathology_report"]


def test_palliative_bone_radiation_only_for_bone_mets_the_note_shows(data):
    n_bone = 0
    for r in _all(data, "treatment_plan") + _all(data, "diagnosis"):
        case = _case(r)
        if any(b in case.rt.target for b in BONES):
            n_bone += 1
            assert "bone" in case.mets, (case.rt, case.mets)
            ctx = r["context"].lower()
            assert not any(neg in ctx for neg in NO_BONE_METS), ctx
            assert case.rt.target.lower() in ctx, (case.rt.target, ctx)
        if case.m:
            assert "brain" not in case.mets or "brain" in case.rt.target
    assert n_bone > 5


def test_brain_lesion_count_is_one_number_and_picks_srs_or_whole_brain(data):
    n_seen = 0
    for r in _all(data, "diagnosis") + _all(data, "treatment_plan") + _all(data, "radonc_regimen"):
        case = _case(r)
        counts = {int(x) for x in re.findall(r"(\d+) (?:enhancing lesion|new intracranial|brain metasta)",
                                             r["context"])}
        if "brain" not in case.mets:
            assert not counts
            continue
        k = int(case.extras["brain_lesions"])
        assert counts <= {k}, (counts, k, r["context"])
        n_seen += bool(counts)
        assert (case.rt.target, case.rt.fx) == (("brain", 1) if k <= 4 else ("whole brain", 10))
    assert n_seen > 5


AFTER_SURGERY = re.compile(r"\bpost[ -]|close deep margin|^adjuvant chemoradiation|after (thyroidectomy|debulking)")
WITHOUT_SURGERY = ("inoperable", "intact cervix", "definitive chemoradiation", "HDR monotherapy",
                   "bladder preservation", "not a resection candidate", "planned", "unresectable")


def test_radiation_cues_agree_with_surgical_history(data):
    dx = {r["patient_id"]: r["response"] for r in _all(data, "diagnosis")}
    plans = {r["patient_id"]: r["response"] for r in _all(data, "treatment_plan")}
    for r in _all(data, "radonc_regimen"):
        case, pid = _case(r), r["patient_id"]
        resected = " s/p " in dx[pid]
        assert resected == case.surgery_done
        if AFTER_SURGERY.search(case.rt.cue):
            assert resected, (case.rt.cue, dx[pid])
        if any(c in case.rt.cue for c in WITHOUT_SURGERY):
            assert not resected, (case.rt.cue, dx[pid])
        if syn.inoperable(case):  # an inoperable patient is not sent to the surgeon
            assert "refer to surgical oncology" not in plans[pid], (case.rt.cue, plans[pid])
        if case.key == "breast" and not case.m:
            assert resected or f"{case.surgery} planned" in case.rt.cue
            # a lumpectomy leaves the breast; a T4 tumour is treated by mastectomy, then the chest wall
            assert ("chest wall" in case.rt.target) == (case.surgery == "mastectomy") == case.t.startswith("4")


def test_prostate_low_risk_and_endometrium_node_cue_follow_tnm(data):
    n_low = 0
    for r in _all(data, "radonc_regimen"):
        case = _case(r)
        if case.key == "prostate" and "low risk" in case.rt.cue:
            n_low += 1
            assert case.t in ("1c", "2a") and case.n == "0" and sum(case.gleason) <= 6 and case.marker_value < 10
        if case.key == "endometrium" and not case.m:
            assert ("node positive" in case.rt.cue) == (case.n != "0"), (case.n, case.rt.cue)
            assert ("node negative" in case.rt.cue) == (case.n == "0")
    cases = [syn.draw_case(f"X{i}", SEED) for i in range(3000)]
    assert any(c.key == "prostate" and "low risk" in c.rt.cue for c in cases)
    for c in cases:
        if c.key == "prostate" and not c.m and not c.surgery_done:
            assert ("low risk" in c.rt.cue) == (c.t in ("1c", "2a") and c.n == "0" and sum(c.gleason) <= 6
                                                and c.marker_value < 10)


_NODES = re.compile(r"(\d+)/\d+ (?:lymph nodes )?positive|nodes negative \((\d+)/\d+\)")


def _positive_counts(text):
    return [int(a or b) for a, b in _NODES.findall(text)]


def test_lymph_node_counts_follow_n(data, docs):
    pairs = [(_case(r), r["sentence"]) for r in _all(data, "phenotype")] + _pathology_reports(docs)
    n_checked = 0
    for case, text in pairs:
        for k in _positive_counts(text):
            n_checked += 1
            assert case.has_tnm
            assert (k == 0) == (case.n == "0"), (case.n, text)
            if case.n[:1] in "23":
                assert k >= 4, (case.n, text)
    assert n_checked > 100


def test_tumor_size_lies_in_its_t_category():
    breast = {"1a": (0, 0.5), "1b": (0.5, 1), "1c": (1, 2), "2": (2, 5), "3": (5, 99)}
    lung = {"1a": (0, 1), "1b": (1, 2), "1c": (2, 3), "2a": (3, 4), "2b": (4, 5), "3": (5, 7), "4": (7, 99)}
    by_t: dict[str, list[float]] = {}
    for i in range(2000):
        c = syn.draw_case(f"S{i}", SEED)
        table = {"breast": breast, "lung": lung}.get(c.key)
        if table and c.t in table:
            lo, hi = table[c.t]
            assert lo < c.size_cm <= hi, (c.key, c.t, c.size_cm)
        elif c.has_tnm and not table:
            by_t.setdefault(c.t[0], []).append(c.size_cm)
    assert max(by_t["1"]) < min(by_t["2"]) and max(by_t["2"]) < min(by_t["3"]) and max(by_t["3"]) < min(by_t["4"])


def test_breast_clock_hours_lie_in_the_quadrant(data):
    n_clock = 0
    for r in _all(data, "phenotype") + _all(data, "diagnosis"):
        case = _case(r)
        for side, hour in re.findall(r"(left|right) breast at the (\d+):00 position", r["context"], re.I):
            n_clock += 1
            assert side.lower() == case.side and case.sub != "central portion"
            assert int(hour) in syn.breast_clock_hours(case.side, case.sub), (case.side, case.sub, hour)
    assert n_clock > 10
    assert syn.breast_clock_hours("left", "upper outer quadrant") == (1, 2)
    assert syn.breast_clock_hours("right", "upper outer quadrant") == (11, 10)


def test_phenotype_single_answers_have_no_comma_and_laterality_is_consistent(data):
    multi = ("receptor_type", "receptor_status", "cancer_stage")
    for r in _all(data, "phenotype"):
        if r["entity_type"] not in multi:
            assert "," not in r["response"], r
        if r["entity_type"] == "tumor_laterality" and r["response"] == syn.NOT_RELEVANT:
            assert not re.search(r"\b(left|right)\b", r["sentence"], re.I), r["sentence"]
    assert any(r["response"] == "glioblastoma idh-wildtype" for r in _all(data, "phenotype"))


def test_pathology_reports_stage_with_p_and_biopsies_have_no_margins_nodes_or_size(docs):
    reports = _pathology_reports(docs)
    assert sum("core needle biopsy" in t for _, t in reports) > 10
    for case, text in reports:
        for line in text.splitlines():
            if line.startswith("- Pathologic stage:"):
                assert not re.search(r"\bc[TN]", line), line
        if "core needle biopsy" in text.splitlines()[0]:
            assert "Margins:" not in text and "Lymph nodes:" not in text and "Pathologic stage" not in text
            assert "Tumor size:" not in text and "lesion measuring" not in text  # cores, not a measured tumour
            assert re.search(r"\d tan-white cores of tissue", text), text
    for r in syn.instruction_datasets(200, seed=SEED)["phenotype"]["train"]:
        if r["sentence"].lower().startswith("pathologic stage"):
            assert not re.search(r"\bc[tn]\d", r["sentence"].lower()), r["sentence"]


def test_regimens_fit_receptors_and_histology(data):
    for r in _all(data, "treatment_plan"):
        case, plan = _case(r), r["response"]
        regs = {case.regimen, case.next_regimen}
        if case.key == "breast":
            her2 = case.receptors["HER2"] == "positive"
            assert all(("trastuzumab" in g or g == "tchp") == her2 for g in regs), (case.receptors, regs)
            assert her2 or ("tchp" not in plan and "trastuzumab" not in plan)
        if case.key == "lung":
            small = case.hist_abbrev == "sclc"
            assert ("etoposide" in plan or "lurbinectedin" in plan) <= small
            assert small <= ("pemetrexed" not in plan and "docetaxel" not in plan)
            assert case.hist_abbrev != "scc" or "pemetrexed" not in plan
            if small:
                assert case.regimen == "cisplatin/etoposide"


def test_radiation_is_held_for_low_counts(data):
    n_low = 0
    for r in _all(data, "treatment_plan"):
        if r["answer_type"] != "radiation":
            continue
        case, steps = _case(r), r["response"].split("\n")
        lab = case.labs
        if lab["hgb"] < 8 or lab["plt"] < 50 or lab["anc"] < 1.0:
            n_low += 1
            resumed = [s for s in steps if s.split(". ", 1)[1].startswith("continue")
                       and (" gy " in s or case.rt.target in s or (case.regimen in s and "ondansetron" not in s))]
            assert not resumed, r["response"]
            assert "recheck cbc" in r["response"]
            assert (lab["hgb"] < 8) == ("transfuse" in r["response"])
        else:
            assert steps[0].startswith("1. continue")
    assert n_low > 3


def test_datasheet_claims_only_abbreviations_and_misspellings_that_occur(tmp_path):
    out = tmp_path / "d"
    syn.write_dataset(str(out), 60, seed=SEED, n_pretrain_docs=300)
    sheet = (out / "DATA.md").read_text()
    text = "\n".join(p.read_text() for p in out.rglob("*.jsonl"))
    claim = next(line for line in sheet.splitlines() if "misspellings" in line)
    abbrevs = re.search(r"abbreviations \(([^)]*)\)", claim).group(1).split(", ")
    typos = re.findall(r"'([a-z]+)'", claim)
    assert typos and "ca" not in abbrevs
    for word in abbrevs + typos:
        assert re.search(rf"(?<![A-Za-z/]){re.escape(word)}(?![A-Za-z/])", text), word


def test_stage_groups_follow_ajcc8_for_breast_and_lung_and_no_figo_edition(data):
    assert syn.stage_group("2", "0", 0, "breast") == "IIA"
    assert syn.stage_group("1c", "1mi", 0, "breast") == "IB"
    assert syn.stage_group("3", "0", 0, "breast") == "IIB"
    assert syn.stage_group("2", "2a", 0, "breast") == "IIIA"
    assert syn.stage_group("2b", "2", 0, "lung") == "IIIA"
    assert syn.stage_group("2b", "0", 0, "lung") == "IIA"
    assert syn.stage_group("1a", "0", 0, "lung") == "IA1"
    assert syn.stage_group("4", "3", 0, "lung") == "IIIC"
    for task in syn.TASKS:
        for r in _all(data, task):
            assert "FIGO 8th" not in r["context"]
            case = _case(r)
            if case.has_tnm:
                assert case.stage == syn.stage_group(case.t, case.n, case.m, case.key)


def test_operation_and_regimen_fit_the_tumour():
    """A Whipple only for the pancreatic head, a mastectomy for T4 breast, trastuzumab for metastatic HER2+ gastric."""
    seen = set()
    for i in range(4000):
        case = syn.draw_case(f"S{i}", SEED)
        if case.key == "pancreas":
            assert (case.surgery == "whipple") == (case.sub == "pancreatic head"), case.sub
            if case.surgery_done and not case.m:
                assert "whipple" not in case.rt.cue or case.sub == "pancreatic head", case.rt.cue
            seen.add(("pancreas", case.surgery))
        if case.key == "breast":
            assert (case.surgery == "mastectomy") == case.t.startswith("4")
        if case.key == "stomach" and case.receptors:
            her2_met = case.receptors["HER2"] == "positive" and bool(case.m)
            assert ("trastuzumab" in case.regimen) == her2_met, (case.receptors, case.m, case.regimen)
            seen.add(("stomach", her2_met))
    assert {("pancreas", "whipple"), ("pancreas", "distal pancreatectomy"), ("stomach", True)} <= seen


CHEMO_CUES = ("chemoradiation", "concurrent", "cisplatin", "trimodality", "temozolomide")


def test_concurrent_chemotherapy_follows_the_radiation_plan():
    """The chemo a radiation note gives alongside is the one its cue calls for: none after a hysterectomy with only
    Sedlis features or a neck dissection with close margins; cisplatin/etoposide or carboplatin/paclitaxel with
    chest radiation, capecitabine with pelvic, pancreatic and gastric chemoradiation (once: none for all of these)."""
    seen = set()
    for i in range(4000):
        case = syn.draw_case(f"Y{i}", SEED)
        if case.phase != "radiation" or case.m:
            continue
        conc, cue = syn.concurrent_regimen(case), case.rt.cue
        if any(c in cue for c in CHEMO_CUES) and case.key != "cervix" or "concurrent" in cue:
            assert conc, (case.key, cue)
        if "Sedlis" in cue or "close margins" in cue or "SBRT" in cue or "short-course" in cue:
            assert not conc, (case.key, cue, conc)
        if case.key == "lung" and "locally advanced" in cue:
            assert conc == "weekly carboplatin/paclitaxel"
        if conc:
            seen.add(case.key)
            w = syn.Writer(syn.random.Random(i), "train")
            assert f"with concurrent {conc}" in syn.subjective_text(w, case)
            assert f"continue {conc}" in syn.plan_text(case) or f"hold {conc}" in syn.plan_text(case)
    assert {"lung", "colorectal", "pancreas", "stomach", "head_neck", "esophagus", "brain"} <= seen


def test_surveillance_maintenance_fits_age_and_risk():
    n = 0
    for i in range(3000):
        case = syn.draw_case(f"Z{i}", SEED)
        if case.phase != "surveillance":
            continue
        plan = syn.plan_text(case)
        if case.key == "breast" and case.receptors["ER"] == "positive":
            n += 1
            assert ("continue tamoxifen" in plan) == (case.age < 50) and ("anastrozole" in plan) == (case.age >= 50)
        if case.key == "prostate" and syn._prostate_low_risk(case):
            assert "leuprolide" not in plan
    assert n > 10


def test_stage_iv_metastases_are_distant_for_ovary_and_cervix():
    """Peritoneal spread of an ovarian cancer is FIGO III and para-aortic nodes of a cervical one IIIC2: neither is
    drawn as the metastasis of a stage IV case."""
    for i in range(3000):
        case = syn.draw_case(f"S{i}", SEED)
        if case.key == "ovary":
            assert "peritoneal" not in case.mets
        if case.key == "cervix":
            assert "nodal" not in case.mets


def test_colon_is_resected_not_irradiated_and_rectal_gets_neoadjuvant_therapy():
    """Radiation is a rectal-cancer standard: a colon primary goes to colectomy, then adjuvant FOLFOX/CAPOX for N+ or
    T4 disease; a T3-4 or N+ rectal cancer gets total neoadjuvant therapy before a low anterior resection."""
    seen = set()
    for i in range(6000):
        case = syn.draw_case(f"C{i}", SEED)
        if case.key != "colorectal":
            continue
        plan, rectal = syn.plan_text(case), case.sub in ("rectum", "rectosigmoid junction")
        if not rectal:
            assert case.phase != "radiation" and " gy " not in plan and "radiation" not in plan, (case.sub, plan)
            assert case.rt.fx == 0 or (case.rt.target == "tumor bed" and case.t == "4" and case.surgery_done)
            assert "pelvis" not in case.rt.target and case.surgery == "colectomy"
            assert bool(syn.radonc_records(case, "train", SEED)) == (case.rt.fx > 0)
            if not case.m and case.phase in ("chemo", "surveillance"):
                assert case.surgery_done, (case.phase, plan)
            if not case.m and case.phase == "chemo":
                assert case.regimen in ("folfox", "capox") and (case.n != "0" or case.t == "4"), (case.t, case.n)
            if case.phase == "consult":
                assert "refer to surgical oncology for colectomy" in plan, plan
            seen.add(("colon", case.phase))
        else:
            assert case.surgery == "low anterior resection" and "colectomy" not in plan
            if not case.m and case.phase == "consult":
                locally_advanced = case.t[0] in "34" or case.n != "0"
                assert ("total neoadjuvant therapy" in plan) == locally_advanced, (case.t, case.n, plan)
                assert ("refer to surgical oncology" in plan) != locally_advanced
            seen.add(("rectal", case.phase))
    assert {("colon", "consult"), ("colon", "chemo"), ("colon", "surveillance"), ("rectal", "radiation")} <= seen


def test_colon_patients_without_radiation_have_no_radonc_records_and_the_datasheet_says_so(tmp_path):
    data = syn.instruction_datasets(300, seed=SEED)
    by_pid = {t: {r["patient_id"] for s in syn.SPLITS for r in data[t][s]} for t in syn.TASKS}
    missing = by_pid["diagnosis"] - by_pid["radonc_regimen"]
    assert missing and by_pid["radonc_regimen"] == by_pid["radonc_modality"] == by_pid["radonc_icd10"]
    assert all(_case({"patient_id": p}).key == "colorectal" for p in missing)
    sheet = syn.datasheet(data, [], 300, SEED)
    assert f"({len(missing)} here:" in sheet


def test_no_chemotherapy_for_stage_i_nor_metastatic_only_regimens_as_adjuvant():
    """Stage I disease gets no chemotherapy phase; docetaxel (prostate) and ipilimumab (melanoma) only when M1."""
    n = 0
    for i in range(4000):
        case = syn.draw_case(f"R{i}", SEED)
        if case.m:
            continue
        if case.phase == "chemo":
            n += 1
            assert case.stage[:2] in ("II", "IV") or case.stage.startswith("III") or not case.has_tnm, case.stage
            assert case.key not in ("kidney", "thyroid")
        regs = case.regimen + case.next_regimen
        assert not (case.key == "prostate" and "taxel" in regs) and not (case.key == "melanoma" and "ipi" in regs)
    assert n > 100


def test_metastases_are_listed_in_one_fixed_order_per_cancer_type():
    """The diagnosis names the sites in the type's fixed order, since the imaging lines come shuffled."""
    n_two = 0
    for i in range(3000):
        case = syn.draw_case(f"M{i}", SEED)
        assert case.mets == [s for s in case.cancer.mets if s in case.mets]
        n_two += len(case.mets) == 2
    assert n_two > 50


def test_interrupted_overwrite_leaves_no_old_datasheet(tmp_path, monkeypatch):
    out = tmp_path / "d"
    syn.write_dataset(str(out), 10, seed=0, n_pretrain_docs=5)
    calls = []

    def failing(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, text)

    real = syn._write_atomic
    monkeypatch.setattr(syn, "_write_atomic", failing)
    with pytest.raises(OSError):
        syn.write_dataset(str(out), 10, seed=1, n_pretrain_docs=5, overwrite=True)
    assert not (out / "DATA.md").exists()  # the folder no longer looks like a complete data set


def test_cli_output_is_byte_identical_whatever_the_hash_seed(tmp_path):
    outs = []
    for hash_seed in ("1", "4242"):
        out = tmp_path / hash_seed
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        cmd = [sys.executable, "tools/make_synthetic_data.py", "--out", str(out), "--seed", "5", "--size", "20"]
        assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=60).returncode == 0
        outs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1] and len(outs[0]) == 2 + 3 * len(syn.TASKS)
    umask = os.umask(0)
    os.umask(umask)  # the user's usual file mode (a mkstemp temp file was 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {oct(0o666 & ~umask)}


def test_tiny_data_sets_have_records_in_every_task_and_split():
    """Patients without radiation have no radonc records; a tiny val/test split of only such patients swaps one."""
    for seed in range(40):
        data = syn.instruction_datasets(10, seed=seed)
        assert all(data[t][s] for t in syn.TASKS for s in syn.SPLITS), seed
        pats = {s: {r["patient_id"] for r in data["diagnosis"][s]} for s in syn.SPLITS}
        assert [len(pats[s]) for s in syn.SPLITS] == [8, 1, 1]
