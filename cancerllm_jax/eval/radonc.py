"""Radiation-oncology tasks (seed 003): modality, ICD-10 and regimen scores, a temperature scan, a Wilcoxon test.

- modality: accuracy and *weighted* precision / recall / F1 (per-class scores averaged with the gold support as
  weights, as scikit-learn's ``average="weighted"``; a class never predicted has precision 0);
- ICD-10: accuracy on the main category (letter + two characters, ``C50.412`` / ``C50412`` → ``C50``, ``O9A.1`` →
  ``O9A``), *macro* precision / recall / F1 over the categories seen in gold or predictions, a confusion matrix by
  ICD-10 chapter, and one by the paper's groups (Fig. 6: neoplasms split into benign / in situ / malignant by site);
- regimen: mean ROUGE-1 recall (``rouge-score``), the paper's footnote-e definition (overlapping unigrams over the
  reference's unigrams), with precision and F-measure beside it;
- :func:`temperature_scan` runs a generate-and-score function at T = 0.1 … 1.0 and :func:`wilcoxon_greater`
  tests "A > B" over paired scan scores with scipy's one-sided Wilcoxon signed-rank test (α = 0.05).

A prediction is free text: the first modality word (or photon / proton technique: IMRT, VMAT, SBRT, IMPT, …) or
ICD-10 code in it is taken; none found → ``UNPARSED``, a label of its own that is always wrong (a gold answer that
names none becomes ``GOLD_UNPARSED``, which no prediction matches; both are counted in the results). Scores are
fractions in [0, 1], as in the paper. numpy only (plus scipy for the test and rouge-score for ROUGE-1); no jax.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MODALITIES = ("photon", "proton", "electron", "brachy")
UNPARSED = "(none)"
GOLD_UNPARSED = "(gold unparsed)"
OTHER_CHAPTER = "other"

# photon techniques (intensity-modulated, arc, stereotactic, 3D conformal, tomotherapy) and proton ones (IMPT)
_PHOTON_WORDS = ("imrt", "vmat", "sbrt", "sabr", "srs", "3d-crt", "3dcrt", "tomotherapy")
_MODALITY_RE = re.compile(r"\b(photons?|protons?|electrons?|brachy\w*|hdr|ldr|impt|"
                          + "|".join(re.escape(w) for w in _PHOTON_WORDS) + r")\b", re.IGNORECASE)
# a code: letter, digit, digit or letter, then an optional subcategory after a dot (C50.912, T36.0X1A) or, without
# the dot, digits and the placeholder X only (C50912), so that mutation names (KRAS G12C, BRAF V600E, EGFR L858R) are
# no codes. A letter in third place is a code only in the categories that have one (_LETTER_CATEGORIES), and in
# lower case (c7b.01) or for M1A (chronic gout) only with a subcategory, so that TNM categories (T1a, T1A, M1a, M1A)
# are no codes.
_ICD_RE = re.compile(r"\b([A-Z])(\d[0-9A-Z])(\.[0-9A-Z]{1,4}|[0-9X]{1,4})?\b", re.IGNORECASE)
_LETTER_CATEGORIES = ("C4A", "C7A", "C7B", "D3A", "M1A", "O9A", "Z3A")

# ICD-10 chapters (WHO numbering; each range the union of WHO's and ICD-10-CM's blocks, so chapter II ends at D49,
# IV at E90, XIX at T98): (first, last, name).
ICD10_CHAPTERS: tuple[tuple[str, str, str], ...] = (
    ("A00", "B99", "I infectious"), ("C00", "D49", "II neoplasms"), ("D50", "D89", "III blood/immune"),
    ("E00", "E90", "IV endocrine"), ("F00", "F99", "V mental"), ("G00", "G99", "VI nervous"),
    ("H00", "H59", "VII eye"), ("H60", "H95", "VIII ear"), ("I00", "I99", "IX circulatory"),
    ("J00", "J99", "X respiratory"), ("K00", "K95", "XI digestive"), ("L00", "L99", "XII skin"),
    ("M00", "M99", "XIII musculoskeletal"), ("N00", "N99", "XIV genitourinary"), ("O00", "O9A", "XV pregnancy"),
    ("P00", "P96", "XVI perinatal"), ("Q00", "Q99", "XVII congenital"), ("R00", "R99", "XVIII symptoms"),
    ("S00", "T98", "XIX injury"), ("V00", "Y99", "XX external causes"), ("Z00", "Z99", "XXI health factors"),
    ("U00", "U85", "XXII special"),
)
CHAPTER_ORDER = tuple(name for _, _, name in ICD10_CHAPTERS) + (OTHER_CHAPTER,)

# The paper's confusion-matrix groups (seed 003: blood, congenital, nervous, eye, benign, in situ and malignant
# neoplasms, the malignant ones by site, here the WHO blocks of chapter II); "Codes that did not fit into these
# defined categories were labeled as 'Others'" (``OTHER_CHAPTER``), neoplasms of uncertain behaviour among them.
NEOPLASM_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("C00", "C14", "malignant: lip, oral cavity, pharynx"), ("C15", "C26", "malignant: digestive"),
    ("C30", "C39", "malignant: respiratory, intrathoracic"), ("C40", "C41", "malignant: bone, cartilage"),
    ("C43", "C44", "malignant: skin"), ("C45", "C49", "malignant: mesothelial, soft tissue"),
    ("C50", "C50", "malignant: breast"), ("C51", "C58", "malignant: female genital"),
    ("C60", "C63", "malignant: male genital"), ("C64", "C68", "malignant: urinary tract"),
    ("C69", "C72", "malignant: eye, brain, CNS"), ("C73", "C75", "malignant: endocrine"),
    ("C76", "C80", "malignant: ill-defined, secondary, unspecified"),
    ("C81", "C96", "malignant: lymphoid, haematopoietic"), ("C97", "C97", "malignant: multiple primaries"),
    ("D00", "D09", "in situ neoplasms"), ("D10", "D36", "benign neoplasms"),
)
PAPER_CHAPTERS = ("III blood/immune", "XVII congenital", "VI nervous", "VII eye")  # the chapters the paper names
# the neoplasm categories with a letter, by ICD-10-CM's blocks (a string comparison would put D3A among D37-D49):
# Merkel cell carcinoma (skin), malignant neuroendocrine tumours of any site (C7A), secondary (C7B) and benign (D3A)
# neuroendocrine tumours
_LETTER_GROUPS = {"C4A": "malignant: skin", "C7A": "malignant: neuroendocrine tumours",
                  "C7B": "malignant: ill-defined, secondary, unspecified",
                  "D3A": "benign neoplasms"}
GROUP_ORDER = (*(name for _, _, name in NEOPLASM_GROUPS[:-2]), _LETTER_GROUPS["C7A"],
               *(name for _, _, name in NEOPLASM_GROUPS[-2:]), *PAPER_CHAPTERS, OTHER_CHAPTER)


# ---------------------------------------------------------------- parsing


def parse_modality(text: str) -> str:
    """The first modality named in ``text`` (``photons`` / ``IMRT`` → ``photon``, ``IMPT`` → ``proton``,
    ``HDR`` / ``brachytherapy`` → ``brachy``)."""
    m = _MODALITY_RE.search(text)
    if not m:
        return UNPARSED
    word = m.group(1).lower()
    if word.startswith("brachy") or word in ("hdr", "ldr"):
        return "brachy"
    if word in _PHOTON_WORDS:
        return "photon"
    return "proton" if word == "impt" else word.rstrip("s")


def icd10_category(text: str) -> str:
    """The main category of the first ICD-10 code in ``text``: ``"C50.412"`` → ``"C50"``; none → ``UNPARSED``."""
    for m in _ICD_RE.finditer(text):
        category, third, sub = f"{m.group(1)}{m.group(2)}".upper(), m.group(2)[1], m.group(3)
        if third.isdigit() or category in _LETTER_CATEGORIES and (sub or third.isupper() and category != "M1A"):
            return category
    return UNPARSED


def _in_ranges(category: str, ranges: tuple[tuple[str, str, str], ...]) -> str | None:
    cat = category.strip().upper()[:3]
    if not re.fullmatch(r"[A-Z]\d[0-9A-Z]", cat):
        return None
    return next((name for first, last, name in ranges if first <= cat <= last), None)


def icd10_chapter(category: str) -> str:
    """The chapter of a main category (``C50`` → ``II neoplasms``); unparsed or unknown → ``other``."""
    return _in_ranges(category, ICD10_CHAPTERS) or OTHER_CHAPTER


def icd10_group(category: str) -> str:
    """The paper's confusion-matrix group: a neoplasm's behaviour (malignant ones by site, ``C50`` → ``malignant:
    breast``, ``D05`` → ``in situ neoplasms``), one of the four chapters the paper names (``D61`` → ``III
    blood/immune``), else ``other`` (``I10``, ``D47``: the paper's "Others")."""
    cat = category.strip().upper()[:3]
    chapter = icd10_chapter(cat)
    return (_LETTER_GROUPS.get(cat) or _in_ranges(cat, NEOPLASM_GROUPS)
            or (chapter if chapter in PAPER_CHAPTERS else OTHER_CHAPTER))


# ---------------------------------------------------------------- classification metrics


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def per_class_prf(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str] | None = None
                  ) -> dict[str, Any]:
    """Per-class precision, recall, F1 and gold support (zero division → 0, as scikit-learn's default)."""
    if len(golds) != len(preds) or not golds:
        raise ValueError(f"need as many predictions as golds (and at least one): {len(golds)} vs {len(preds)}")
    labels = list(labels) if labels is not None else sorted(set(golds) | set(preds))
    g, p = np.asarray(golds, dtype=object), np.asarray(preds, dtype=object)
    tp = np.array([np.sum((g == lab) & (p == lab)) for lab in labels], dtype=float)
    n_pred = np.array([np.sum(p == lab) for lab in labels], dtype=float)
    support = np.array([np.sum(g == lab) for lab in labels], dtype=float)
    precision, recall = _safe_div(tp, n_pred), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"labels": labels, "precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_report(golds: Sequence[str], preds: Sequence[str], average: str,
                          labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy and ``average`` ("weighted" or "macro") precision / recall / F1, plus the per-class table."""
    pc = per_class_prf(golds, preds, labels)
    if average == "weighted":
        w = pc["support"] / pc["support"].sum()
    elif average == "macro":
        w = np.full(len(pc["labels"]), 1.0 / len(pc["labels"]))
    else:
        raise ValueError(f"average must be 'weighted' or 'macro', got {average!r}")
    acc = float(np.mean(np.asarray(golds, dtype=object) == np.asarray(preds, dtype=object)))
    per_class = {lab: {"precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                       "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                 for i, lab in enumerate(pc["labels"])}
    return {"accuracy": acc, "precision": float(w @ pc["precision"]), "recall": float(w @ pc["recall"]),
            "f1": float(w @ pc["f1"]), "average": average, "n": len(golds), "per_class": per_class}


def _parsed(parse: Callable[[str], str], golds: Sequence[str], preds: Sequence[str]
            ) -> tuple[list[str], list[str], dict[str, int]]:
    """Parsed labels, a gold that names none as ``GOLD_UNPARSED`` (so an unparsed prediction never matches it),
    and the two counts."""
    g = [GOLD_UNPARSED if (c := parse(x)) == UNPARSED else c for x in golds]
    p = [parse(x) for x in preds]
    return g, p, {"unparsed_golds": g.count(GOLD_UNPARSED), "unparsed_predictions": p.count(UNPARSED)}


def modality_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """Treatment-modality selection: accuracy and weighted P/R/F1 over parsed modalities."""
    g, p, counts = _parsed(parse_modality, golds, preds)
    return classification_report(g, p, "weighted") | counts


def confusion_matrix(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts ``[i, j]`` of gold ``labels[i]`` predicted as ``labels[j]``."""
    index = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(golds, preds, strict=True):
        cm[index[g], index[p]] += 1
    return cm


def icd10_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """ICD-10: main-category accuracy, macro P/R/F1, and confusion matrices (rows gold) by chapter and by the
    paper's groups (unparsed codes fall in ``other``)."""
    g, p, counts = _parsed(icd10_category, golds, preds)
    out = classification_report(g, p, "macro") | counts
    for key, fn, order in (("chapter", icd10_chapter, CHAPTER_ORDER), ("group", icd10_group, GROUP_ORDER)):
        gc, pc = [fn(x) for x in g], [fn(x) for x in p]
        labels = [c for c in order if c in set(gc) | set(pc)]
        out[f"{key}s"] = labels
        out[f"{key}_confusion"] = confusion_matrix(gc, pc, labels).tolist()
    return out


def regimen_rouge1(golds: Sequence[str], preds: Sequence[str], use_stemmer: bool = False) -> dict[str, Any]:
    """Treatment regimen: mean ROUGE-1 as the paper defines it (footnote e: overlapping unigrams / unigrams of the
    reference, i.e. rouge-score's ROUGE-1 *recall*, its default tokenizer) with the per-instance values; the
    precision and F-measure means beside it."""
    from rouge_score.rouge_scorer import RougeScorer

    if len(golds) != len(preds) or not golds:
        raise ValueError(f"need as many predictions as golds (and at least one): {len(golds)} vs {len(preds)}")
    scorer = RougeScorer(["rouge1"], use_stemmer=use_stemmer)
    scores = [scorer.score(g, p)["rouge1"] for g, p in zip(golds, preds, strict=True)]
    per = [s.recall for s in scores]
    return {"rouge1": float(np.mean(per)), "rouge1_precision": float(np.mean([s.precision for s in scores])),
            "rouge1_f": float(np.mean([s.fmeasure for s in scores])), "per_instance": per, "n": len(per)}


def plot_chapter_confusion(result: dict[str, Any], path: str, title: str = "ICD-10 chapters", by: str = "chapter"
                           ) -> str:
    """Write a confusion matrix of :func:`icd10_metrics` (``by`` = "chapter" or "group") as a PNG (rows gold,
    columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm, labels = np.asarray(result[f"{by}_confusion"]), result[f"{by}s"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.0 * len(labels) + 2.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel(f"predicted {by}")
    ax.set_ylabel(f"gold {by}")
    ax.set_title(title)
    fig.tight_layout()
    from cancerllm_jax.eval.report import save_figure

    save_figure(fig, path)  # complete or not at all
    plt.close(fig)
    return path


# ---------------------------------------------------------------- temperature scan and significance


def temperature_scan(generate_fn: Callable[[float], Any], temperatures: Sequence[float] | None = None,
                     score_fn: Callable[[Any], float] | None = None) -> dict[str, Any]:
    """Call ``generate_fn(T)`` for T = 0.1 … 1.0 (10 runs); score each result with ``score_fn`` (or take it as
    the score when ``score_fn`` is None). Returns the temperatures, scores, max and median."""
    temps = np.linspace(0.1, 1.0, 10) if temperatures is None else np.asarray(temperatures, dtype=float)
    temps = [round(float(t), 6) for t in temps]
    scores = []
    for t in temps:
        out = generate_fn(t)
        scores.append(float(score_fn(out) if score_fn is not None else out))
    return {"temperatures": temps, "scores": scores, "max": max(scores), "median": float(np.median(scores))}


def wilcoxon_greater(a_scores: Sequence[float], b_scores: Sequence[float], alpha: float = 0.05) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank test of "A > B" on paired scores (e.g. the 10 runs of a temperature scan).

    Returns the statistic (sum of positive ranks), the p-value, ``significant`` (p < ``alpha``), n (pairs),
    n_nonzero (pairs that differ: scipy's default drops the others) and alpha. All-equal pairs cannot favour A: p = 1.
    The differences are rounded to 10 decimals first, so that differences equal but for floating-point noise
    (2/403 - 1/403 and 3/403 - 2/403) tie, as they do in exact arithmetic, and take midranks.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equally long, non-empty score lists: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a score is NaN or infinite; the test needs finite paired scores")
    d = np.round(a - b, 10)
    out = {"n": int(a.size), "n_nonzero": int(np.sum(d != 0)), "alpha": alpha}
    if np.all(d == 0):
        return {"statistic": 0.0, "p_value": 1.0, "significant": False} | out
    res = wilcoxon(d, alternative="greater")
    p = float(res.pvalue)
    return {"statistic": float(res.statistic), "p_value": p, "significant": bool(p < alpha)} | out
