"""Misspellings and counterfactual labels: exact counts, determinism, the four edit kinds, absent wrong labels."""
import pytest

from cancerllm_jax.eval.noise import (
    EDIT_KINDS,
    NOT_RELEVANT,
    QWERTY_NEIGHBOURS,
    corrupt_phenotype_labels,
    eligible_words,
    misspell_edits,
    misspell_record,
    misspell_text,
    round_half_up,
)

TEXT = ("Metastatic lung cancer with brain mets (cT2N2aM1), stage IV. Patient DENIES pain; ER+/PR+, HER2-. "
        "MRI brain shows new ring-enhancing lesions; plan whole brain RT 30 Gy in 10 fx.")


def _kind_of(old: str, new: str) -> str:
    """Classify an edit from the two words alone (independent of the code under test)."""
    o, n = old.lower(), new.lower()
    if len(n) == len(o) - 1:
        return "drop" if any(o[:i] + o[i + 1:] == n for i in range(len(o))) else "?"
    if len(n) == len(o) + 1:
        return "insert" if any(n[:i] + n[i + 1:] == o for i in range(len(n))) else "?"
    diff = [i for i in range(len(o)) if o[i] != n[i]]
    if len(diff) == 2 and diff[1] == diff[0] + 1 and o[diff[0]] == n[diff[1]] and o[diff[1]] == n[diff[0]]:
        return "swap"
    if len(diff) == 1 and n[diff[0]] in QWERTY_NEIGHBOURS[o[diff[0]]]:
        return "substitute"
    return "?"


def test_eligible_words_skip_codes_numbers_and_single_letters():
    words = [m.group() for m in eligible_words("cT2N2aM1 a 30 Gy, ER+/PR+ ring-enhancing")]
    assert words == ["Gy", "ER", "PR", "ring", "enhancing"]


@pytest.mark.parametrize("rate", [0.0, 0.02, 0.04, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_exact_count_and_only_chosen_words_change(rate):
    n = len(eligible_words(TEXT))
    new, edits = misspell_edits(TEXT, rate, seed=3)
    assert len(edits) == round_half_up(rate * n)
    assert len({e.start for e in edits}) == len(edits)
    # rebuild the original from the edits: everything outside the edited words is untouched (punctuation, codes)
    rebuilt = new
    for e in edits:  # left to right: the text before e.start is already the original again
        assert rebuilt[e.start:e.start + len(e.new)] == e.new
        rebuilt = rebuilt[:e.start] + e.original + rebuilt[e.start + len(e.new):]
    assert rebuilt == TEXT


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 0.49, 0.6 * 5)] == [1, 2, 3, 0, 3]


def test_deterministic_and_seed_dependent():
    assert misspell_text(TEXT, 0.4, 7) == misspell_text(TEXT, 0.4, 7)
    assert misspell_text(TEXT, 0.4, 7) != misspell_text(TEXT, 0.4, 8)


def test_edits_are_the_four_kinds_and_keep_case():
    seen = set()
    for seed in range(30):
        for e in misspell_edits(TEXT, 0.5, seed)[1]:
            assert e.kind in EDIT_KINDS and e.new != e.original
            assert _kind_of(e.original, e.new) == e.kind, (e.original, e.new, e.kind)
            if e.original.isupper():
                assert e.new.isupper()
            elif e.original.islower():
                assert e.new.islower()
            seen.add(e.kind)
    assert seen == set(EDIT_KINDS)


def test_misspell_record_touches_only_fields():
    rec = {"id": "x", "instruction": "Give the diagnosis please", "context": TEXT, "response": "lung cancer"}
    out = misspell_record(rec, 0.5, seed=1)
    assert out["instruction"] == rec["instruction"] and out["response"] == rec["response"]
    assert out["context"] != TEXT and rec["context"] == TEXT
    n = len(eligible_words(TEXT))
    assert out["noise"] == {"kind": "misspell", "rate": 0.5, "words": round_half_up(0.5 * n), "eligible": n}


def _records():
    sents = [("ER positive, PR negative, HER2 positive.", "receptor_type", "ER, PR, HER2"),
             ("4.7 x 3.8 cm mass in the left breast, upper outer quadrant.", "tumor_size", "4.7 x 3.8 cm"),
             ("4.7 x 3.8 cm mass in the left breast, upper outer quadrant.", "tumor_laterality", "left"),
             ("4.7 x 3.8 cm mass in the left breast, upper outer quadrant.", "tumor_site", "upper outer quadrant"),
             ("invasive lobular carcinoma, grade 2.", "histological_type", "invasive lobular carcinoma"),
             ("invasive lobular carcinoma, grade 2.", "cancer_grade", "grade 2"),
             ("invasive lobular carcinoma, grade 2.", "cancer_stage", NOT_RELEVANT),
             ("pathologic stage: pT2 pN1a, stage IIB.", "cancer_stage", "pT2, pN1a, IIB"),
             ("pathologic stage: pT2 pN1a, stage IIB.", "tumor_size", NOT_RELEVANT),
             ("right lower inner quadrant, 12 mm.", "tumor_laterality", "right")]
    return [{"id": f"p{i}", "task": "phenotype", "sentence": s, "context": f"{s} What is the {t}?",
             "entity_type": t, "response": r} for i, (s, t, r) in enumerate(sents)]


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6, 0.8])
def test_counterfactual_exact_count_and_absent_labels(rate):
    recs = _records()
    new, ids = corrupt_phenotype_labels(recs, rate, seed=0)
    assert len(ids) == round_half_up(rate * len(recs)) and len(set(ids)) == len(ids)
    for old, r in zip(recs, new):
        if r["id"] in ids:
            assert r["response"] != old["response"] and r["counterfactual"]["original"] == old["response"]
            assert r["response"] != NOT_RELEVANT
            for item in r["response"].split(","):
                assert item.strip().lower() not in r["sentence"].lower()
                assert item.strip().lower() not in r["context"].lower()
            if old["response"] == NOT_RELEVANT:
                assert r["counterfactual"]["kind"] == "not_relevant_swap"
        else:
            assert r == old
    assert new == corrupt_phenotype_labels(recs, rate, seed=0)[0]  # deterministic
    assert recs == _records()  # inputs untouched


def test_counterfactual_uses_other_records_entities():
    new, _ = corrupt_phenotype_labels(_records(), 1.0, seed=5)
    labels = {r["response"] for r in new}
    assert labels & {r["response"] for r in _records()}  # wrong labels come (at least partly) from the pool
    assert {r["counterfactual"]["kind"] for r in new} <= {"same_type", "other_type", "not_relevant_swap"}


@pytest.mark.parametrize("seed", range(40))
def test_counterfactual_labels_are_wrong_as_the_scorer_sees_them(seed):
    """A wrong label never shares a normalised item with the gold (``er+, pr+, her2+`` is the gold ``ER, PR, HER2``
    to the scorer) and none of its items occurs, normalised, in the sentence."""
    from cancerllm_jax.eval.noise import scorer_words as _words
    from cancerllm_jax.eval.protocol import score_instance

    s1, s2 = "receptor studies: ER positive, PR negative, HER2 positive.", "staging: ct2n2am1; er+/pr+, her2+."
    recs = _records() + [  # the second record's label is the first's gold, punctuated
        {"id": "a", "task": "phenotype", "sentence": s1, "context": s1 + "\nWhat is the receptor type?",
         "entity_type": "receptor_type", "response": "ER, PR, HER2"},
        {"id": "b", "task": "phenotype", "sentence": s2, "context": s2 + "\nWhat is the receptor status?",
         "entity_type": "receptor_status", "response": "er+, pr+, her2+"}]
    new, _ = corrupt_phenotype_labels(recs, 1.0, seed=seed)
    for old, r in zip(recs, new, strict=True):
        if old["response"] != NOT_RELEVANT:
            assert score_instance(old["response"], r["response"])["em_f1"] == 0, (old["response"], r["response"])
        sentence = " ".join(_words(r["context"]))
        for item in r["response"].split(","):
            assert f" {' '.join(_words(item))} " not in f" {sentence} ", (item, r["context"])


def test_words_with_other_letters_are_neither_edited_nor_cut():
    text = "Ménétrier disease, café-au-lait spots, naïve cafe\u0301 patient; x-ray (straße) ok."
    assert [m.group() for m in eligible_words(text)] == ["disease", "au", "lait", "spots", "patient", "ray", "ok"]
    for seed in range(5):
        new, edits = misspell_edits(text, 1.0, seed)
        assert len(edits) == 7 and all(w in new for w in ("Ménétrier", "café", "naïve", "cafe\u0301", "straße"))
        assert new.count(",") == 2 and new.endswith(".") and "(" in new and ";" in new


def test_decomposed_accents_do_not_cut_words():
    text = "nai\u0308ve e\u0301tude re\u0301sume\u0301 ok"  # NFD: the accent is a combining mark after its letter
    assert [m.group() for m in eligible_words(text)] == ["ok"]
    assert misspell_text(text, 1.0, 0).startswith("nai\u0308ve e\u0301tude re\u0301sume\u0301 ")


def test_not_relevant_in_any_case_is_never_an_entity():
    recs = [{"id": i, "task": "phenotype", "entity_type": "tumor_site", "sentence": "mass in the breast",
             "context": "", "response": "not relevant" if i % 2 else "left breast"} for i in range(10)]
    new, ids = corrupt_phenotype_labels(recs, 1.0, seed=0)
    assert len(ids) == 10
    for old, r in zip(recs, new, strict=True):
        assert r["response"].lower() != "not relevant" and r["response"] != old["response"]
        assert (r["counterfactual"]["kind"] == "not_relevant_swap") == (old["response"] == "not relevant")


def test_counterfactual_labels_are_absent_even_inside_slashed_receptor_lists():
    s = "Tumor is ER+/PR+/HER2- invasive ductal carcinoma, HER2/neu negative."
    recs = [{"id": i, "task": "phenotype", "entity_type": "receptor_status", "sentence": s, "context": s,
             "response": "er+"} for i in range(30)]
    new, _ = corrupt_phenotype_labels(recs, 1.0, seed=0)
    present = {"pr", "pr+", "her2", "her2-", "er, pr", "her2/neu"}
    assert not present & {r["response"].lower() for r in new}


def test_a_phenotype_question_is_never_misspelled():
    """A phenotype context holds the question: only the record's sentence inside it is misspelled (the question
    used to be misspelled with it); without a sentence in the context the whole context is, as for other tasks."""
    sentence = "Invasive ductal carcinoma of the left breast, nottingham grade two."
    question = "Which histological type does this passage mention?"
    rec = {"id": 1, "sentence": sentence, "context": f'Given the text "{sentence}" - {question}', "response": "x"}
    out = misspell_record(rec, 1.0, seed=3)
    n = len(eligible_words(sentence))
    assert out["noise"] == {"kind": "misspell", "rate": 1.0, "words": n, "eligible": n}
    assert out["context"].startswith('Given the text "') and out["context"].endswith(f'" - {question}')
    assert sentence not in out["context"]
    whole = misspell_record({**rec, "sentence": "not in the context"}, 1.0, seed=3)
    assert question not in whole["context"] and whole["noise"]["eligible"] == len(eligible_words(rec["context"]))


def test_counterfactual_without_entity_types_draws_from_the_data_labels():
    """Records in the documented format (no entity_type) get wrong labels from the data's own labels (they were all
    drawn from the 24 built-in strings)."""
    from cancerllm_jax.eval.noise import FALLBACK_ENTITIES

    recs = [{k: v for k, v in r.items() if k != "entity_type"} for r in _records()]
    new, ids = corrupt_phenotype_labels(recs, 1.0, seed=0)
    own = {r["response"] for r in recs} - {NOT_RELEVANT}
    built_in = {e for es in FALLBACK_ENTITIES.values() for e in es}
    wrong = [r["response"] for r in new]
    assert len(ids) == len(recs) and all(w in own for w in wrong) and not set(wrong) & (built_in - own)
    assert {r["counterfactual"]["kind"] for r in new} <= {"other_label", "not_relevant_swap"}
    for old, r in zip(recs, new):
        assert r["response"] != old["response"]
        assert r["response"].lower() not in old["sentence"].lower()


def test_the_sentence_is_found_as_quoted_and_as_whole_words():
    """Templates quote a sentence without its full stop (177 of 515 synthetic training records were misspelled
    whole); 'pain' is not the start of the question's 'painful'."""
    from cancerllm_jax.eval.noise import sentence_span

    rec = {"sentence": "Tumour size 2 cm.", "context": "In the text Tumour size 2 cm, what is the size?"}
    at, end = sentence_span(rec, rec["context"])
    assert rec["context"][at:end] == "Tumour size 2 cm"
    rec = {"id": 1, "sentence": "pain", "context": "Is the patient painful? Sentence: pain"}
    assert sentence_span(rec, rec["context"]) == (34, 38)
    assert misspell_record(rec, 1.0, 0)["context"].startswith("Is the patient painful? Sentence: ")
    assert sentence_span({"sentence": "absent"}, "no such words") is None
    spaced = {"sentence": "ER positive, PR negative.", "context": "Report:\nER  positive,\nPR negative. Which?"}
    at, end = sentence_span(spaced, spaced["context"])  # the same words with other whitespace: found
    assert spaced["context"][at:end] == "ER  positive,\nPR negative."


def test_a_typed_record_never_draws_other_types_from_untyped_labels():
    """Mixed data: untyped labels may be of any type, so a typed record's 'other_type' label is a typed one."""
    typed = _records()
    untyped = [{"id": f"u{i}", "task": "phenotype", "sentence": "Nothing here.", "context": "Nothing here.",
                "response": label} for i, label in enumerate(("stage iv", "left breast", "12 mm"))]
    for seed in range(10):
        new, _ = corrupt_phenotype_labels(typed + untyped, 1.0, seed=seed)
        for r in new[:len(typed)]:
            if r["counterfactual"]["kind"] in ("other_type", "not_relevant_swap"):  # a typed Not relevant too
                assert r["response"] not in {"stage iv", "left breast", "12 mm"}


@pytest.mark.parametrize("n", [8, 22, 69, 100, 300])
def test_sweeps_are_nested_and_a_shared_word_is_noised_alike(n):
    """The words (records) noised at a lower rate are among those noised at a higher one, with the same edit (wrong
    label). random.sample's picks for two counts are not nested (it switches methods with the count: 69 words at
    6 % and 8 %, 100 records at 20 % and 40 % broke it)."""
    text = " ".join(f"word{'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10 % 10]}x" for i in range(n))
    rates = [0.02, 0.04, 0.06, 0.08, 0.2, 0.4, 0.6, 0.8, 1.0]
    for seed in (0, 1, "s"):
        edits = [{(e.start, e.original): e.new for e in misspell_edits(text, r, seed)[1]} for r in rates]
        for low, high in zip(edits, edits[1:]):
            assert low.items() <= high.items()
    recs = [{**_records()[i % len(_records())], "id": f"r{i}"} for i in range(n)]
    for seed in (0, 1):
        runs = [corrupt_phenotype_labels(recs, r, seed) for r in rates]
        for (low_recs, low_ids), (high_recs, high_ids) in zip(runs, runs[1:]):
            assert set(low_ids) <= set(high_ids)
            assert all(a == b for a, b in zip(low_recs, high_recs) if a["id"] in low_ids)
