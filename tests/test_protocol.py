"""The scoring protocol (EVAL_PROTOCOL.md): hand-computed edge cases, independent re-computations, files and CLI."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

if importlib.util.find_spec("cancerllm_jax") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cancerllm_jax.errors import UserError
from cancerllm_jax.eval import KEYS, score, score_file
from cancerllm_jax.eval.protocol import dedupe, normalize, split_answers

ROOT = Path(__file__).resolve().parents[1]

# COCO BLEU-2 of a one-word exact match: p1 = (1+1e-15)/(1+1e-9), p2 = 1e-15/1e-9 = 1e-6, ρ = p1 < 1.
ONE_WORD_COCO = math.sqrt((1 + 1e-15) / (1 + 1e-9) * 1e-6) * math.exp(1 - (1 + 1e-9) / (1 + 1e-15))


def prf(p: float, r: float) -> tuple[float, float, float]:
    """(P, R, F1) in percent from fractions."""
    return 100 * p, 100 * r, (200 * p * r / (p + r) if p + r else 0.0)


def check(gold: str, pred: str, protocol: str, metric: str, p: float, r: float, tol: float = 1e-6) -> None:
    res = score([gold], [pred], protocol=protocol)
    got = (res[f"{metric}_p"], res[f"{metric}_r"], res[f"{metric}_f1"])
    assert got == pytest.approx(prf(p, r), abs=tol), (gold, pred, protocol, metric, got)


# ---------------------------------------------------------------- answers and normalisation


def test_split_and_dedupe():
    assert split_answers("pr, her2, er") == ["pr", "her2", "er"]
    assert split_answers(" , a,, b ,") == ["a", "b"]
    assert split_answers("") == [] and split_answers(" , ") == []
    assert dedupe(["er", "pr", "er", "ER"]) == ["er", "pr", "ER"]


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Lung cancer.", "lung cancer"),
        ("Tumors", "tumor"),
        ("HER2/neu", "her2neu"),  # punctuation is removed, not replaced by a space
        ("1.5 cm", "15 cm"),
        ("  Invasive   Ductal ", "invas ductal"),
        ("Not relevant", "not relev"),
        ("...", ""),
        ("metastatic lung cancer with brain mets", "metastat lung cancer with brain met"),
        ("ER−", "er−"),  # U+2212 is not ASCII punctuation: it stays
    ],
)
def test_normalize(raw, norm):
    assert normalize(raw) == norm


# ---------------------------------------------------------------- hand-computed instances

BOTH = ("standard", "reference")


@pytest.mark.parametrize("protocol", BOTH)
@pytest.mark.parametrize("gold, pred", [("", ""), (" , ", ""), ("", ",")])
def test_both_empty(protocol, gold, pred):
    res = score([gold], [pred], protocol=protocol)
    assert all(res[k] == 100.0 for k in KEYS)


@pytest.mark.parametrize("protocol", BOTH)
def test_gold_empty_pred_empty(protocol):
    for metric in ("em", "bleu2", "rougeL"):
        check("", "lung cancer", protocol, metric, 0.0, 1.0)  # G empty, P not → (0, 1, 0)
        check("lung cancer", "", protocol, metric, 1.0, 0.0)  # P empty → (1, 0, 0)
    assert score([""], ["x"], protocol=protocol)["avg_f1"] == 0.0


@pytest.mark.parametrize("protocol", BOTH)
def test_answers_that_normalise_to_empty(protocol):
    check(".", "-", protocol, "em", 1.0, 1.0)  # both normalise to "" → match 1
    check(".", "x", protocol, "rougeL", 0.0, 0.0)  # exactly one empty → match 0


@pytest.mark.parametrize("protocol", BOTH)
def test_punctuation_and_stemming_exact(protocol):
    for gold, pred in [("lung cancer", "Lung cancer."), ("Tumors", "tumor"), ("Not relevant", "not relevant"),
                       ("metastatic tumors", "Metastatic tumor!")]:
        check(gold, pred, protocol, "em", 1.0, 1.0)
        check(gold, pred, protocol, "rougeL", 1.0, 1.0)


def test_one_word_bleu2():
    check("er", "ER", "standard", "bleu2", 1.0, 1.0)  # effective order: unigrams only
    assert abs(ONE_WORD_COCO - 1e-3) < 1e-8
    check("er", "ER", "reference", "bleu2", ONE_WORD_COCO, ONE_WORD_COCO, tol=1e-9)


def test_duplicates_dropped_from_predictions():
    check("er", "er, er, pr", "standard", "em", 0.5, 1.0)  # P = {er, pr}: (1 + 0) / 2
    check("er", "er, er, pr", "standard", "bleu2", 0.5, 1.0)
    check("er, er", "er", "standard", "em", 1.0, 1.0)  # golds are not deduplicated, but both match
    res = score(["er"], ["er, er, pr"], protocol="reference")
    miss = math.sqrt(1e-15 / (1 + 1e-9) * 1e-6) * math.exp(1 - (1 + 1e-9) / (1 + 1e-15))  # pr vs er
    assert res["bleu2_p"] == pytest.approx(100 * (ONE_WORD_COCO + miss) / 2, rel=1e-9)
    assert res["rougeL_p"] == pytest.approx(50.0)


@pytest.mark.parametrize("protocol", BOTH)
def test_multi_answer(protocol):
    check("pr, her2, er", "er, pr", protocol, "em", 1.0, 2 / 3)  # F1 = 0.8
    check("pr, her2, er", "er, pr", protocol, "rougeL", 1.0, 2 / 3)
    assert score(["pr, her2, er"], ["er, pr"], protocol=protocol)["em_f1"] == pytest.approx(80.0)


def test_multi_answer_bleu2():
    check("pr, her2, er", "er, pr", "standard", "bleu2", 1.0, 2 / 3)
    res = score(["pr, her2, er"], ["er, pr"], protocol="reference")
    assert res["bleu2_p"] == pytest.approx(100 * ONE_WORD_COCO, rel=1e-6)
    assert res["bleu2_r"] == pytest.approx(100 * 2 * ONE_WORD_COCO / 3, rel=1e-6)
    assert res["bleu2_f1"] == pytest.approx(100 * 0.8 * ONE_WORD_COCO, rel=1e-6)


def test_not_relevant_vs_partial():
    # gold [not, relev], pred [relev]
    check("Not relevant", "relevant", "standard", "em", 0.0, 0.0)
    check("Not relevant", "relevant", "standard", "rougeL", 2 / 3, 2 / 3)  # LCS 1: p 1, r 1/2
    check("Not relevant", "relevant", "standard", "bleu2", math.exp(-1), math.exp(-1))  # unigram 1, BP e^(1-2)
    ref_rouge = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1)
    check("Not relevant", "relevant", "reference", "rougeL", ref_rouge, ref_rouge)
    coco = math.sqrt((1 + 1e-15) / (1 + 1e-9) * 1e-6) * math.exp(1 - (2 + 1e-9) / (1 + 1e-15))
    check("Not relevant", "relevant", "reference", "bleu2", coco, coco, tol=1e-9)


def test_partial_phrase():
    gold, pred = "metastatic lung cancer with brain mets", "lung cancer with mets"  # 6 vs 4 tokens, all 4 in gold
    check(gold, pred, "standard", "rougeL", 0.8, 0.8)  # LCS 4: p 1, r 2/3
    bleu = math.exp(1 - 6 / 4) * math.sqrt(1 * 2 / 3)  # bigrams: lung cancer, cancer with of 3
    check(gold, pred, "standard", "bleu2", bleu, bleu)
    ref_rouge = 2.44 * (2 / 3) / (2 / 3 + 1.44)
    check(gold, pred, "reference", "rougeL", ref_rouge, ref_rouge)
    check(gold, pred, "reference", "bleu2", bleu, bleu)


def test_word_order():
    gold, pred = "left breast upper quadrant", "upper quadrant left breast"
    check(gold, pred, "standard", "rougeL", 0.5, 0.5)  # LCS 2 of 4
    check(gold, pred, "reference", "rougeL", 1.0, 1.0)  # same token sets
    check(gold, pred, "standard", "bleu2", math.sqrt(2 / 3), math.sqrt(2 / 3))  # 2 of 3 bigrams, BP 1
    check(gold, pred, "reference", "bleu2", math.sqrt(2 / 3), math.sqrt(2 / 3))
    # no bigram match: sacrebleu's exp smoothing gives p2 = 1 / (2 · 1); COCO gives p2 ≈ 1e-15
    check("ductal carcinoma", "carcinoma ductal", "standard", "bleu2", math.sqrt(0.5), math.sqrt(0.5))
    check("ductal carcinoma", "carcinoma ductal", "reference", "bleu2", 0.0, 0.0, tol=1e-4)


def test_repeated_tokens_are_clipped():
    gold, pred = "grade 2", "grade grade 2"
    check(gold, pred, "standard", "bleu2", math.sqrt(1 / 3), math.sqrt(1 / 3))  # p1 2/3, p2 1/2, BP 1
    check(gold, pred, "reference", "bleu2", math.sqrt(1 / 3), math.sqrt(1 / 3))
    check(gold, pred, "standard", "rougeL", 0.8, 0.8)  # LCS 2: p 2/3, r 1
    check(gold, pred, "reference", "rougeL", 1.0, 1.0)


def test_rouge_keeps_non_ascii_tokens():
    # rouge-score's default tokenizer would turn "er−" into "er"; our tokens stay as normalised
    check("ER−", "ER", "standard", "rougeL", 0.0, 0.0)
    check("ER−", "ER", "standard", "em", 0.0, 0.0)


def test_contract_example_and_means():
    for protocol in BOTH:
        res = score(["lung cancer", "pr, er"], ["Lung cancer.", "er"], protocol=protocol, per_instance=True)
        assert (res["em_p"], res["em_r"], res["n"]) == (100.0, 75.0, 2)
        assert res["em_f1"] == pytest.approx((100 + 200 / 3) / 2)
        assert res["avg_f1"] == pytest.approx((res["em_f1"] + res["bleu2_f1"] + res["rougeL_f1"]) / 3)
        assert [row["index"] for row in res["rows"]] == [0, 1]
        assert res["rows"][1]["em_r"] == 50.0
    assert "rows" not in score(["a"], ["a"])


def test_bad_arguments():
    """Each is a ``UserError`` (as the README promises of every user-fixable problem) and still the built-in
    ValueError / TypeError a caller may catch."""
    from cancerllm_jax.errors import UserError

    for kind, call, match in ((ValueError, lambda: score(["a"], ["a"], protocol="coco"), "standard, reference"),
                              (ValueError, lambda: score(["a"], ["a", "b"]), "1 golds, 2 predictions"),
                              (ValueError, lambda: score([], []), "empty"),
                              (TypeError, lambda: score("a", "a"), "not a string"),
                              (TypeError, lambda: score({"a": 1}, ["a"]), "not a dict"),  # was scored by its keys
                              (TypeError, lambda: score(["a"], 3), "not a int"),
                              (TypeError, lambda: score([None], ["a"]), "instance 0")):
        with pytest.raises(kind, match=match) as e:
            call()
        assert isinstance(e.value, UserError)
    assert score((g for g in ["er", "pr"]), iter(["er", "pr"]))["avg_f1"] == 100.0  # any iterable, read once


# ---------------------------------------------------------------- independent re-computation on varied pairs

PAIRS = [
    ("lung cancer", "Lung cancer."),
    ("metastatic lung cancer with brain mets", "lung cancer with mets"),
    ("nsclc t4n2m0", "NSCLC, T4N2M0"),
    ("pr, her2, er", "er, pr"),
    ("pr, her2, er", "ER, PR, HER2, Ki-67"),
    ("Not relevant", "Not relevant"),
    ("Not relevant", "left breast"),
    ("left breast", "Not relevant"),
    ("2.5 cm", "2.5 cm x 1.8 cm"),
    ("grade 3", "Grade III"),
    ("invasive ductal carcinoma", "infiltrating ductal carcinoma"),
    ("invasive ductal carcinoma", "ductal carcinoma in situ, invasive ductal carcinoma"),
    ("positive", "positive, positive"),
    ("positive, negative", "negative"),
    ("stage IIA", "stage 2a"),
    ("right", "right breast, left breast"),
    ("", "Not relevant"),
    ("Not relevant", ""),
    ("", ""),
    ("upper outer quadrant", "outer upper quadrant"),
    ("estrogen receptor positive, progesterone receptor negative", "ER positive, PR negative"),
    ("small cell lung cancer", "non-small cell lung cancer"),
    ("diffuse large b-cell lymphoma", "DLBCL"),
    ("1. start carboplatin and pemetrexed 2. repeat ct chest in 6 weeks 3. follow up with radiation oncology",
     "1. Start carboplatin/pemetrexed. 2. Repeat CT chest in 6 weeks."),
    ("continue letrozole, follow up in 3 months", "Continue letrozole; follow-up in 3 months"),
    ("tumors of the left lung", "left lung tumor"),
    ("the the the cat", "the cat the"),
    ("grade 2", "grade grade 2"),
    ("her2 negative breast cancer", "breast cancer, her2 negative"),
    ("recurrent glioblastoma multiforme", "glioblastoma"),
    ("ER−", "ER"),
    ("T2N0M0", "t2 n0 m0"),
]


def _norm(text: str) -> str:
    from nltk.stem.porter import PorterStemmer

    stem = PorterStemmer().stem
    text = re.sub(f"[{re.escape(string.punctuation)}]", "", text.lower())
    return " ".join(stem(t) for t in text.split())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(g: str, p: str) -> float:
    a, b = g.split(), p.split()
    lcs = _lcs(a, b)
    return 2 * lcs / (len(a) + len(b)) if lcs else 0.0  # F1 of (lcs/|p|, lcs/|g|)


def _set_f(g: str, p: str) -> float:
    c, r = set(p.split()), set(g.split())
    if not c & r:
        return 0.0
    prec, rec = len(c & r) / len(c), len(c & r) / len(r)
    return 2.44 * prec * rec / (rec + 1.44 * prec)


def _coco_bleu2(g: str, p: str) -> float:
    hyp, ref = p.split(), g.split()
    out = 1.0
    for n in (1, 2):
        hc = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        rc = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        out *= (sum((hc & rc).values()) + 1e-15) / (max(len(hyp) - n + 1, 0) + 1e-9)
    ratio = (len(hyp) + 1e-15) / (len(ref) + 1e-9)
    return math.sqrt(out) * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def _instance(gold: str, pred: str, fn) -> tuple[float, float, float]:
    golds = [_norm(x.strip()) for x in gold.split(",") if x.strip()]
    preds = []
    for x in (x.strip() for x in pred.split(",")):
        if x and x not in preds:
            preds.append(x)
    preds = [_norm(x) for x in preds]
    if not golds:
        return (1.0, 1.0) if not preds else (0.0, 1.0)
    if not preds:
        return 1.0, 0.0

    def m(g: str, p: str) -> float:
        return float(g == p) if not g or not p else fn(g, p)

    return (sum(max(m(g, p) for g in golds) for p in preds) / len(preds),
            sum(max(m(g, p) for p in preds) for g in golds) / len(golds))


@pytest.mark.parametrize(
    "protocol, metric, fn",
    [("standard", "rougeL", _rouge_l), ("reference", "rougeL", _set_f), ("reference", "bleu2", _coco_bleu2),
     ("standard", "em", lambda g, p: float(g == p))],
)
def test_independent_recomputation(protocol, metric, fn):
    golds, preds = [g for g, _ in PAIRS], [p for _, p in PAIRS]
    res = score(golds, preds, protocol=protocol, per_instance=True)
    want = [prf(*_instance(g, p, fn)) for g, p in PAIRS]
    for row, w in zip(res["rows"], want, strict=True):
        assert (row[f"{metric}_p"], row[f"{metric}_r"], row[f"{metric}_f1"]) == pytest.approx(w, abs=0.01), row
    for i, key in enumerate(("p", "r", "f1")):
        assert res[f"{metric}_{key}"] == pytest.approx(sum(w[i] for w in want) / len(want), abs=0.01)


# ---------------------------------------------------------------- files


def _jsonl(path: Path, rows: list) -> str:
    """Rows as JSON lines (strings and bytes written as they are)."""
    def raw(r):
        return r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8")

    path.write_bytes(b"".join(raw(r) + b"\n" for r in rows))
    return str(path)


@pytest.fixture
def gold(tmp_path):
    return _jsonl(tmp_path / "gold.jsonl", [{"id": "a", "response": "lung cancer"}, {"id": "b", "response": "pr, er"}])


def test_score_file_takes_the_clis_names_and_says_which_file_is_wrong(tmp_path, gold):
    """``gold=`` / ``pred=`` (as --gold / --pred) and a prediction file alone by keyword were TypeErrors; a folder
    or a missing file said "cannot read (Is a directory)" where every other reader says what to give."""
    from cancerllm_jax.errors import UserTypeError

    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "lung cancer", "gold": "lung cancer"},
                                         {"id": "b", "prediction": "er", "gold": "pr, er"}])
    assert score_file(gold=gold, pred=pred) == score_file(gold, pred)
    assert score_file(pred=pred) == score_file(pred_path=pred) == score_file(None, pred)
    for kwargs, needle in (({"gold": gold, "gold_path": gold, "pred": pred}, "both gold= and gold_path="),
                           ({"gold": gold}, "needs the prediction file"),
                           ({"pred": pred, "prtocol": "x"}, "'protocol'")):
        with pytest.raises(UserTypeError, match=needle):
            score_file(**kwargs)
    with pytest.raises(UserError, match="is a folder; give a file"):
        score_file(gold, str(tmp_path))
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        score_file(str(tmp_path / "missing.jsonl"), pred)


def test_predictions_that_hold_their_prompt_are_scored_on_their_response(tmp_path, gold, caplog):
    """Another generator's whole decoded text in a prediction file (the prompt, then the answer) is scored on the
    text after the '### Response:' that closes its prompt, as the protocol takes a generation (it was scored as it
    stood: avg F1 9 instead of 100), and a warning counts them; a few-shot prompt's exemplars (each with its own
    '### Response:') are skipped; a model's own made-up '### Response:' after its answer is kept, and a prompt with
    no response header is scored as it stands, with a warning. ``score()`` scores what it is given."""
    from cancerllm_jax.eval.protocol import generated_text, score

    one = "Below is an instruction that describes a task.\n\n### Input:\n{}\n\n### Response:\n{}"
    prompt = one.format("note", " Lung cancer. ")
    shots = one.format("other note", "pr, er") + "\n\n" + prompt
    made_up = "er\n\n### Response: pr"
    assert generated_text(shots) == "\n Lung cancer. " and generated_text(made_up) is made_up
    assert score(["lung cancer"], [prompt])["avg_f1"] < 50  # score() takes the text as given
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": shots},
                                         {"id": "b", "prediction": made_up}])
    with caplog.at_level(logging.WARNING):
        res = score_file(gold, pred, per_instance=True)
    assert res["rows"][0]["avg_f1"] == 100.0 and res["rows"][0]["prediction"] == shots
    assert res["rows"][1]["em_r"] == 0.0  # kept whole, one answer: cut at its header, "pr" would match a gold
    assert "1 of 2 predictions in" in caplog.text and "hold their prompt" in caplog.text, caplog.text
    caplog.clear()
    pred = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "prediction": prompt},
                                         {"id": "b", "prediction": "### Instruction:\nName the receptors."}])
    with caplog.at_level(logging.WARNING):
        res = score_file(gold, pred, per_instance=True)
    assert res["rows"][0]["avg_f1"] == 100.0 and res["rows"][1]["avg_f1"] == 0.0
    assert "has no '### Response:'" in caplog.text and "hold their prompt" in caplog.text, caplog.text
    # our own files (generate.py, `evaluate.py run`: rows with a prompt_hash) hold the generation alone: a header the
    # model made is part of its answer, as `evaluate.py report` scores it (they were cut here, not there)
    caplog.clear()
    ours = _jsonl(tmp_path / "ours.jsonl", [{"id": "a", "prompt_hash": "x", "prediction": "### Response: lung cancer"},
                                            {"id": "b", "prompt_hash": "y", "prediction": prompt}])
    with caplog.at_level(logging.WARNING):
        res = score_file(gold, ours, per_instance=True)
    assert [r["avg_f1"] for r in res["rows"]] == [score(["lung cancer"], ["### Response: lung cancer"])["avg_f1"],
                                                  score(["pr, er"], [prompt])["avg_f1"]]
    assert res["rows"][0]["avg_f1"] < 100.0 and "predictions in" not in caplog.text


def test_score_file_by_id_and_by_order(tmp_path, gold, caplog):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "b", "prediction": "er"}, {"id": "a", "prediction": "Lung cancer."}])
    res = score_file(gold, pred, per_instance=True)
    assert (res["em_p"], res["em_r"]) == (100.0, 75.0)
    assert [row["id"] for row in res["rows"]] == ["a", "b"]
    ordered = _jsonl(tmp_path / "o.jsonl", [{"prediction": "Lung cancer."}, {"prediction": "er"}])
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.eval.protocol"):
        assert score_file(gold, ordered)["em_r"] == 75.0
    assert "gold.jsonl has ids but" in caplog.text and "o.jsonl has none: paired by line order" in caplog.text
    caplog.clear()
    mixed = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "response": "lung cancer"}, {"response": "pr, er"}])
    named = _jsonl(tmp_path / "mp.jsonl", [{"id": "line2", "prediction": "er"}, {"id": "a", "prediction": "lung"}])
    assert score_file(mixed, named, per_instance=True)["em_r"] == 25.0  # as `evaluate.py run` names the ids
    runner = _jsonl(tmp_path / "r.jsonl", [{"id": 1, "prompt_hash": "x", "gold": "pr, er", "prediction": "er"}])
    assert score_file(None, runner, protocol="reference")["em_r"] == 50.0
    # gold lines without ids are line<N> (as `evaluate.py run` names them), whatever order the predictions are in
    plain = _jsonl(tmp_path / "g.jsonl", [{"response": "Lung cancer."}, {"response": "er, pr"}])
    run_out = _jsonl(tmp_path / "run.jsonl", [{"id": "line2", "prediction": "er"},
                                              {"id": "line1", "prediction": "Lung cancer."}])
    assert score_file(plain, run_out)["em_r"] == 75.0
    with pytest.raises(UserError, match=r"g\.jsonl:2: id 'line2' has no prediction.*named line<N>"):
        score_file(plain, _jsonl(tmp_path / "x.jsonl", [{"id": "line1", "prediction": "er"}, {"id": "b"}]))
    other = _jsonl(tmp_path / "gen.jsonl", [{"id": "in.jsonl:1", "prediction": "Lung cancer."},
                                            {"id": "in.jsonl:2", "prediction": "er"}])
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.eval.protocol"):
        assert score_file(plain, other)["em_r"] == 75.0  # ids that name no gold line: paired by line, said
    assert "gen.jsonl has ids but" in caplog.text and "paired by line order" in caplog.text
    both = _jsonl(tmp_path / "b.jsonl", [{"answer": "pr, er", "prediction": "er"}])  # the gold field is named
    assert score_file(None, both, gold_field="answer")["em_r"] == 50.0
    # a null id is no id, as `evaluate.py run` reads the same test file (its records are line<N>)
    nulls = _jsonl(tmp_path / "n.jsonl", [{"id": None, "response": "Lung cancer."}, {"id": None, "response": "er"}])
    assert score_file(nulls, run_out)["em_r"] == 100.0  # by id: run_out lists line2 first
    assert score_file(nulls, ordered)["em_r"] == 100.0


def test_score_file_finds_the_usual_field_names_and_says_so(tmp_path, gold, caplog):
    """A gold file of ``gold`` / ``answer`` lines and predictions in ``output`` / ``response`` are scored as named
    (``response`` and ``prediction`` were the only names, and --gold-field / --pred-field a must), with a warning."""
    canonical = score_file(gold, _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "lung cancer"},
                                                               {"id": "b", "prediction": "er"}]))
    for gold_name, pred_name in (("gold", "output"), ("answer", "response"), ("target", "generation")):
        golds = _jsonl(tmp_path / f"{gold_name}.jsonl", [{"id": "a", gold_name: "lung cancer"},
                                                         {"id": "b", gold_name: "pr, er"}])
        preds = _jsonl(tmp_path / f"{pred_name}.jsonl", [{"id": "a", pred_name: "lung cancer"},
                                                         {"id": "b", pred_name: "er"}])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cancerllm_jax.eval.protocol"):
            assert score_file(golds, preds) == canonical
        assert f"no 'response' field; scoring its '{gold_name}' field as the gold" in caplog.text
        assert f"no 'prediction' field; scoring its '{pred_name}' field as the prediction" in caplog.text
    # an Alpaca-style gold file's 'output', and a prediction file that kept that record and added its text: the
    # model's text is scored, never the gold copy (it scored 100)
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"id": "a", "instruction": "i", "output": "lung cancer"},
                                                {"id": "b", "instruction": "i", "output": "pr, er"}])
    kept = _jsonl(tmp_path / "kept.jsonl", [{"id": "a", "output": "lung cancer", "generated": "lung cancer"},
                                            {"id": "b", "output": "pr, er", "generated": "er"}])
    assert score_file(alpaca, kept) == canonical
    with pytest.raises(UserError, match=r"gold\.jsonl:1: missing field 'response' \(fields: id, text\)"):
        score_file(_jsonl(tmp_path / "gold.jsonl", [{"id": "a", "text": "x"}]), gold)


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"id": "a", "prediction": "x"}', "{not json"], r"p\.jsonl:2: not valid JSON"),
        (["[1, 2]"], r"p\.jsonl:1: expected a JSON object"),
        ([{"id": "a", "prediction": "x"}, {"id": "b", "text": "y"}], r"p\.jsonl:2: missing field 'prediction'"),
        ([{"id": "a", "prediction": "x"}, {"id": "b", "prediction": None}], r"p\.jsonl:2: .*must be a string"),
        ([{"id": "a", "prediction": "x"}, {"id": "b", "prediction": ["Jane Roe"]}],
         r"p\.jsonl:2: field 'prediction' must be a string, got array$"),  # the type, never the text
        ([{"id": "a", "prediction": "x"}, {"id": ["Jane Roe"], "prediction": "y"}],
         r"p\.jsonl:2: 'id' must be a string or an integer, got array$"),
        ([{"id": "a", "prediction": "x"}, {"prediction": "y"}], r"p\.jsonl:2: missing 'id'"),
        ([{"id": "a", "prediction": "x"}, {"id": "a", "prediction": "y"}], r"p\.jsonl:2: duplicate id 'a'"),
        ([{"id": "a", "prediction": "x"}], r"gold\.jsonl:2: id 'b' has no prediction"),
        ([{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}, {"id": "c", "prediction": "z"}],
         r"p\.jsonl:3: id 'c' is not in"),
        ([{"prediction": "x"}], r"gold\.jsonl has 2 lines but .*p\.jsonl has 1"),
        (["", "  "], r"p\.jsonl: empty file"),
        ([b'{"id": "a", "prediction": "x"}', b'{"id": "b", "prediction": "\xff"}'], r"p\.jsonl:2: not valid UTF-8"),
        (['\ufeff{"id": "a", "prediction": "x\u2028y"}'], r"gold\.jsonl:2: id 'b' has no prediction"),
    ],
)
def test_score_file_errors(tmp_path, gold, rows, message):
    pred = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=message):
        score_file(gold, pred)


def test_score_file_other_errors(tmp_path, gold):
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        score_file(gold, str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"gold\.jsonl:1: missing field 'gold'.*the gold file: --gold"):
        score_file(None, gold)
    from cancerllm_jax.eval.protocol import rows_by_id

    with pytest.raises(UserError, match=r"g\.jsonl:2: duplicate id 'line1' \(first on line 1, a line without an id"):
        rows_by_id("g.jsonl", [(1, {"response": "a"}), (2, {"id": "line1", "response": "b"})], implicit=True)
    with pytest.raises(UserError, match="valid protocols"):
        score_file(gold, gold, protocol="rouge")


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_score_and_errors(tmp_path, gold):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "Lung cancer."}, {"id": "b", "prediction": "er"}])
    out, rows = tmp_path / "out" / "s.json", tmp_path / "out" / "rows.jsonl"
    done = _cli("score", "--gold", gold, "--pred", pred, "--protocol", "reference", "--json", str(out),
                "--per-instance", str(rows))
    assert done.returncode == 0, done.stderr
    assert "EM" in done.stdout and "75.00" in done.stdout
    assert "the ROUGE-L row is its unigram-set F-measure" in done.stdout  # the row's label says ROUGE-L
    summary = json.loads(out.read_text())
    assert summary["protocol"] == "reference" and summary["em_r"] == 75.0 and summary["n"] == 2
    assert [json.loads(line)["id"] for line in rows.read_text().splitlines()] == ["a", "b"]

    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops"])
    done = _cli("score", "--gold", gold, "--pred", bad)
    assert done.returncode == 2 and "bad.jsonl:1:" in done.stderr and "Traceback" not in done.stderr
    done = _cli("run")  # the task runner needs at least --model and --out (tests/test_eval_runner.py covers it)
    assert done.returncode == 2 and "--model" in done.stderr and "Traceback" not in done.stderr


def test_cli_outputs_are_written_atomically(tmp_path, gold, monkeypatch):
    """--json / --per-instance appear complete or not at all (temp file + rename, as every other output)."""

    from cancerllm_jax.train import run_io

    written = []
    real = run_io.write_text_atomic
    monkeypatch.setattr(run_io, "write_text_atomic", lambda path, text: (written.append(Path(path).name),
                                                                         real(path, text)))
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launch" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "er"}])
    out = tmp_path / "o"
    assert evaluate.main(["score", "--gold", gold, "--pred", pred, "--json", str(out / "s.json"),
                          "--per-instance", str(out / "rows.jsonl")]) == 0
    assert written == ["s.json", "rows.jsonl"] and sorted(p.name for p in out.iterdir()) == ["rows.jsonl", "s.json"]


def test_report_bolds_only_a_best_average_that_shows_as_best():
    from cancerllm_jax.eval.report import score_table

    row = {f"{m}_{x}": 50.0 for m in ("em", "bleu2", "rougeL") for x in ("p", "r", "f1")}
    tied = score_table("diagnosis", {"a": {**row, "avg_f1": 85.004, "n": 3}, "b": {**row, "avg_f1": 85.001, "n": 3}})
    assert "**" not in "".join(tied[2:])  # both print 85.00: no winner to mark
    won = score_table("diagnosis", {"a": {**row, "avg_f1": 85.004, "n": 3}, "b": {**row, "avg_f1": 84.99, "n": 3}})
    assert "| **85.00** |" in won[2] and "**" not in won[3]
