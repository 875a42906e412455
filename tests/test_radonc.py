"""Radiation-oncology scores against hand-computed values, and the one-sided Wilcoxon test against exact values."""
import json
import numpy as np
import pytest

from cancerllm_jax.eval.radonc import (
    GOLD_UNPARSED,
    GROUP_ORDER,
    UNPARSED,
    icd10_category,
    icd10_chapter,
    icd10_group,
    icd10_metrics,
    plot_chapter_confusion,
    modality_metrics,
    parse_modality,
    regimen_rouge1,
    temperature_scan,
    wilcoxon_greater,
)


def test_parse_modality():
    assert parse_modality("plan 25 Gy/ 5 fx photons. primary, photon") == "photon"
    assert parse_modality("HDR brachytherapy") == "brachy"
    assert parse_modality("Proton") == "proton"
    assert parse_modality("radiation") == UNPARSED
    assert parse_modality("IMRT to the left breast") == "photon" and parse_modality("3D-CRT") == "photon"
    assert parse_modality("SBRT 50 Gy/5 fx") == "photon" and parse_modality("IMPT") == "proton"
    assert parse_modality("photon-based plan") == "photon" and parse_modality("simrt") == UNPARSED


def test_unparsed_answers_are_always_wrong():
    # an unparsed prediction never matches, not even a gold that names no modality / code either
    m = modality_metrics(["IMRT", "photon", "no idea"], ["I am not sure", "photon", "unclear"])
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert (m["unparsed_golds"], m["unparsed_predictions"]) == (1, 2)
    assert m["per_class"][GOLD_UNPARSED]["recall"] == 0 and m["per_class"][UNPARSED]["precision"] == 0
    m = icd10_metrics(["C50.9", "see notes"], ["no idea", "unknown"])
    assert m["accuracy"] == 0 and (m["unparsed_golds"], m["unparsed_predictions"]) == (1, 2)


def test_modality_weighted_by_hand():
    golds = ["photon", "photon", "photon", "proton", "electron", "brachy"]
    preds = ["photons", "proton", "photon", "proton", "photon", "HDR brachy"]
    m = modality_metrics(golds, preds)
    # photon: tp 2, predicted 3, support 3 → P 2/3 R 2/3 F1 2/3; proton: tp 1, predicted 2 → P 1/2 R 1 F1 2/3;
    # electron: 0 / 0 / 0 (support 1); brachy: 1 / 1 / 1 (support 1). Weights 3/6, 1/6, 1/6, 1/6.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((3 * 2 / 3 + 0.5 + 0 + 1) / 6)
    assert m["recall"] == pytest.approx((3 * 2 / 3 + 1 + 0 + 1) / 6)
    assert m["f1"] == pytest.approx((3 * 2 / 3 + 2 / 3 + 0 + 1) / 6)
    assert m["per_class"]["proton"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_icd10_category_and_chapter():
    assert icd10_category("C50.412") == "C50"
    assert icd10_category("the code is c34.11") == "C34"
    assert icd10_category("plan a 25 Gy") == UNPARSED
    assert icd10_chapter("C50") == "II neoplasms" and icd10_chapter("D49") == "II neoplasms"
    assert icd10_chapter("D50") == "III blood/immune" and icd10_chapter("I10") == "IX circulatory"
    assert icd10_chapter("T88") == "XIX injury" and icd10_chapter(UNPARSED) == "other"
    # codes without the dot, letters in the category (O9A, C4A) and after the dot; WHO and ICD-10-CM ranges
    assert [icd10_category(x) for x in ("C509", "C50912", "O9A.11", "C4A.1", "T36.0X1A", "(c61)")] == [
        "C50", "C50", "O9A", "C4A", "T36", "C61"]
    assert icd10_category("KRAS G12C mutated, C34.1") == "C34" and icd10_category("T2N0M0, HbA1c 6") == UNPARSED
    mutations = {"BRAF V600E mutated melanoma, C43.9": "C43", "EGFR L858R NSCLC, C34.1": "C34",
                 "EGFR T790M, C34.1": "C34", "PIK3CA H1047R, C50.9": "C50", "IDH1 R132H glioma C71.9": "C71"}
    for text, code in {**mutations, "o9a.1": "O9A"}.items():  # mutation names are no codes
        assert icd10_category(text) == code, text
    # TNM categories (T1a, T1A, N2a, M1a, M1A) are no codes; a letter in third place is one only in the categories
    # that have one (C4A, C7A, C7B, D3A, M1A, O9A, Z3A), in lower case or for M1A only with a subcategory
    tnm = {"Stage T1a N0 M0, C50.911": "C50", "M1a disease. C34.90": "C34", "ypT2 N2a, C18.9": "C18",
           "stage T1a. C50.9": "C50", "Stage T1A N0 M0, C50.9": "C50", "T2 N1 M1A, C34.90": "C34",
           "M1A.0": "M1A", "c4a.9": "C4A", "C7B.01": "C7B", "c7b": UNPARSED, "D3A": "D3A", "Z3A.2": "Z3A"}
    for text, code in tnm.items():
        assert icd10_category(text) == code, text
    assert icd10_chapter("E90") == "IV endocrine" and icd10_chapter("F00") == "V mental"
    assert icd10_chapter("T98") == "XIX injury" and icd10_chapter("O9A") == "XV pregnancy"
    # the paper's groups: neoplasms by behaviour, malignant ones by site; blood, congenital, nervous and eye; the
    # rest "Others" (other chapters kept their names, uncertain behaviour had its own group)
    assert icd10_group("C50") == "malignant: breast" and icd10_group("C34") == "malignant: respiratory, intrathoracic"
    assert icd10_group("D05") == "in situ neoplasms" and icd10_group("D24") == "benign neoplasms"
    assert icd10_group("D61") == "III blood/immune" and icd10_group(UNPARSED) == "other"
    assert [icd10_group(x) for x in ("Q21", "G93", "H40")] == ["XVII congenital", "VI nervous", "VII eye"]
    assert [icd10_group(x) for x in ("I10", "E11", "Z51", "D47", "H65")] == ["other"] * 5
    # the letter categories by ICD-10-CM's blocks, not by string order (D3A sorts among D37-D49)
    assert [icd10_group(x) for x in ("D3A", "C4A", "C7A", "C7B")] == [
        "benign neoplasms", "malignant: skin", "malignant: neuroendocrine tumours",
        "malignant: ill-defined, secondary, unspecified"]
    assert len(set(GROUP_ORDER)) == len(GROUP_ORDER) and {icd10_group(c) for c in (
        f"{a}{n:02d}" for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for n in range(100))} <= set(GROUP_ORDER)


def test_icd10_macro_and_chapter_confusion_by_hand():
    golds = ["C50.412", "C50.1", "C61", "C34.1"]
    preds = ["C50.911", "C61", "C61", "I10 hypertension"]
    m = icd10_metrics(golds, preds)
    # labels C34, C50, C61, I10: C34 0/0/0; C50 P 1 R 1/2 F1 2/3; C61 P 1/2 R 1 F1 2/3; I10 0/0/0
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx((0 + 1 + 0.5 + 0) / 4)
    assert m["recall"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert m["chapters"] == ["II neoplasms", "IX circulatory"]
    assert m["chapter_confusion"] == [[3, 1], [0, 0]]
    assert m["groups"] == ["malignant: respiratory, intrathoracic", "malignant: breast", "malignant: male genital",
                           "other"]  # the paper's "Others"
    assert m["group_confusion"] == [[0, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert icd10_metrics(["C50.9"], ["C509"])["accuracy"] == 1
    m = icd10_metrics(["C7A.1", "O9A.1"], ["C44.9", "o9a.1"])  # letter categories; pregnancy is one of "Others"
    assert m["accuracy"] == 0.5 and m["groups"] == ["malignant: skin", "malignant: neuroendocrine tumours", "other"]
    assert sum(map(sum, m["group_confusion"])) == 2


def test_confusion_plot(tmp_path):
    m = icd10_metrics(["C50.9", "D05.1", "D61"], ["C50", "C50.1", "D61.0"])
    for by in ("chapter", "group"):
        path = plot_chapter_confusion(m, str(tmp_path / f"{by}.png"), by=by)
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_regimen_rouge1():
    gold = "plan 25 Gy/ 5 fx photons. primary, photon, 25.0Gy, fractions:5"
    assert regimen_rouge1([gold], [gold])["rouge1"] == pytest.approx(1.0)
    # "30 gy in 10 fx" vs "plan 30 gy 10 fx": tokens overlap {30, gy, 10, fx} = 4 of 5 and 4 of 5 → F 0.8
    assert regimen_rouge1(["plan 30 Gy 10 fx"], ["30 Gy in 10 fx"])["rouge1"] == pytest.approx(0.8)
    # the paper's footnote e: overlapping unigrams / unigrams of the reference (recall), not the F-measure
    r = regimen_rouge1(["plan 30 Gy 10 fx"], ["30 Gy"])
    assert r["rouge1"] == pytest.approx(2 / 5) and r["rouge1_precision"] == pytest.approx(1.0)
    assert r["rouge1_f"] == pytest.approx(2 * 0.4 / 1.4) and r["per_instance"] == [pytest.approx(0.4)]


def test_temperature_scan():
    res = temperature_scan(lambda t: t * 2)
    assert res["temperatures"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert res["max"] == pytest.approx(2.0) and res["median"] == pytest.approx(1.1)
    assert temperature_scan(lambda t: [t], [0.5], score_fn=lambda p: p[0] + 1)["scores"] == [1.5]


def test_wilcoxon_greater_known_values():
    # 10 runs all better: exact one-sided p = 1 / 2^10 (the paper's p = 0.001 with n = 10)
    a = np.linspace(0.5, 0.6, 10)
    r = wilcoxon_greater(a, a - np.arange(1, 11) / 100)
    assert r["statistic"] == 55 and r["p_value"] == pytest.approx(1 / 1024) and r["significant"]
    # differences 1..10 with signs + + - + - + + - + +: W+ = 1+2+4+6+7+9+10 = 39; exact P(W+ >= 39) = 141 / 1024
    # (141 of the 1024 subsets of 1..10 sum to at least 39)
    d = np.array([1, 2, -3, 4, -5, 6, 7, -8, 9, 10], dtype=float)
    r = wilcoxon_greater(d, np.zeros(10))
    assert r["statistic"] == 39 and r["p_value"] == pytest.approx(141 / 1024) and not r["significant"]
    assert wilcoxon_greater([1, 2], [1, 2])["p_value"] == 1.0
    assert wilcoxon_greater([1, 2, 3], [0, 2, 1])["n_nonzero"] == 2  # scipy drops the tied pair
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_greater([1, float("nan")], [0, 0])
    # accuracies k/403: differences equal in exact arithmetic tie (midranks) although their floats differ; on the
    # floats scipy ranked them apart (here W+ 16.5, p 0.383; exactly W+ 16, p 0.422)
    a = np.array([300, 302, 301, 299, 305, 300, 303, 298, 304, 301]) / 403
    b = np.array([302, 303, 301, 297, 305, 299, 302, 300, 304, 298]) / 403
    exact = wilcoxon_greater(np.array([300, 302, 301, 299, 305, 300, 303, 298, 304, 301.]),
                             np.array([302, 303, 301, 297, 305, 299, 302, 300, 304, 298.]))
    r = wilcoxon_greater(a, b)
    assert (r["statistic"], r["p_value"], r["n_nonzero"]) == (exact["statistic"], exact["p_value"], 7)
    assert r["statistic"] == 16


def test_scan_pools_tasks_on_one_scale():
    """The overall test puts fractions (RT accuracy) and percent (Average F1) on one scale: A's 0.05 accuracy gain
    at every temperature outweighs B's 1-point F1 gain."""
    from cancerllm_jax.eval.scan import wilcoxon_tests

    t = np.arange(10) / 100
    by_task = {"radonc_modality": {"A": {"scores": list(0.6 + t)}, "B": {"scores": list(0.55 + t)}},
               "phenotype": {"A": {"scores": list(30 + t)}, "B": {"scores": list(31 + t)}}}
    tests = wilcoxon_tests(by_task, ["A", "B"])["A > B"]
    assert tests["radonc_modality"]["significant"] and not tests["phenotype"]["significant"]
    assert tests["overall"]["n"] == 20 and tests["overall"]["significant"]


def test_radonc_per_instance_values_follow_the_split_order(tmp_path):
    """metrics.json's radonc per_instance lines up with tasks[task].ids (the split's order); it followed the
    prediction file's (decode, longest-first) order."""
    from cancerllm_jax.eval.runner import score_predictions

    golds = {"a": "cisplatin weekly", "b": "carboplatin paclitaxel weekly", "c": "FOLFOX"}
    preds = {"a": "weekly", "b": "carboplatin paclitaxel weekly", "c": "none"}
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt_hash": "h", "gold": golds[i], "prediction": preds[i]}) + "\n"
                            for i in ("b", "c", "a")))
    res = score_predictions(str(path), "standard", order=["a", "b", "c"], task="radonc_regimen")
    assert res["radonc"]["per_instance"] == [0.5, 1.0, 0.0]
