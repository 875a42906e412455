"""Seeded noise for CancerLLM's robustness testbeds: misspelled words and counterfactual phenotype labels.

- :func:`misspell_text` misspells an exact share of the words of a text with the four edits a typist makes
  (adjacent swap, dropped letter, inserted letter, keyboard-neighbour substitution), keeping case and the
  punctuation around each word. A *word* is a run of at least two ASCII letters bounded by non-alphanumerics
  (letters and digits of any script, and combining accents, count as alphanumerics), so codes such as
  ``ct2n2am1``, numbers and words with other letters (``café``, ``naïve``) are never touched, nor cut in two.
- :func:`corrupt_phenotype_labels` gives an exact share of phenotype training instances a wrong label: an entity
  (of the same or another entity type) that does not occur in the instance's sentence, or, for a
  ``Not relevant`` instance, such an irrelevant entity in place of ``Not relevant``. Wrong labels are drawn from
  the data's own labels of the chosen type together with a small built-in list per type; a record that names no
  ``entity_type`` / ``answer_type`` draws from all of the data's labels (the built-in ones only when none fits).

Counts are ``round(rate × n)`` rounded half up, per text for misspellings (so on short texts the share misspelled
differs from the rate: 2 % of 20 words is no word; the sweep reports the share actually misspelled); every choice
comes from a ``random.Random`` seeded with a string, so results are identical across runs and processes. The seed
does not hold the rate: the words or instances are taken in one seeded order, and each word's edit (each record's
wrong label) is seeded by its position, so those noised at a lower rate are among those noised at a higher one, noised
alike (nested sweeps). Pure Python: no jax, no numpy.
"""
from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EDIT_KINDS = ("swap", "drop", "insert", "substitute")
NOT_RELEVANT = "Not relevant"
_PUNCT_TO_SPACE = str.maketrans(string.punctuation, " " * len(string.punctuation))
WORD_RE = re.compile(r"(?<![^\W_]|[\u0300-\u036f])[A-Za-z]{2,}(?![^\W_]|[\u0300-\u036f])")

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    """Letter → the letters whose keys touch it on a QWERTY keyboard (same row ±1, rows above/below)."""
    pos = {ch: (r, c + 0.5 * r) for r, row in enumerate(_ROWS) for c, ch in enumerate(row)}  # staggered rows
    out: dict[str, str] = {}
    for ch, (r, x) in pos.items():
        near = [o for o, (r2, x2) in pos.items() if o != ch and abs(r2 - r) <= 1 and abs(x2 - x) <= 1.0]
        out[ch] = "".join(sorted(near))
    return out


QWERTY_NEIGHBOURS = _qwerty_neighbours()


def round_half_up(x: float) -> int:
    """``round`` without banker's rounding (2.5 → 3), robust to float noise such as 0.6 × 5 = 3.0000000000000004."""
    return math.floor(x + 0.5 + 1e-9)


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


# ---------------------------------------------------------------- misspellings


@dataclass(frozen=True)
class Edit:
    """One misspelled word: where it starts in the original text, the word before and after, and the edit kind."""

    start: int
    original: str
    new: str
    kind: str


def _like(ch: str, template: str) -> str:
    """``ch`` in the case of ``template``."""
    return ch.upper() if template.isupper() else ch.lower()


def _neighbour(rng: random.Random, ch: str) -> str:
    return _like(rng.choice(QWERTY_NEIGHBOURS[ch.lower()]), ch)


def _apply(word: str, kind: str, rng: random.Random) -> str | None:
    """``word`` with one edit of ``kind``, or None when that edit cannot change this word."""
    n = len(word)
    if kind == "swap":
        spots = [i for i in range(n - 1) if word[i].lower() != word[i + 1].lower()]
        if not spots:
            return None
        i = rng.choice(spots)
        a, b = word[i], word[i + 1]
        return word[:i] + _like(b, a) + _like(a, b) + word[i + 2:]  # case stays with the position
    if kind == "drop":
        i = rng.randrange(n)
        return word[:i] + word[i + 1:]
    if kind == "insert":  # a neighbouring key pressed along with letter i, typed before or after it
        i = rng.randrange(n)
        extra = _neighbour(rng, word[i])
        return word[:i] + extra + word[i:] if rng.random() < 0.5 else word[:i + 1] + extra + word[i + 1:]
    if kind == "substitute":
        i = rng.randrange(n)
        return word[:i] + _neighbour(rng, word[i]) + word[i + 1:]
    raise ValueError(f"unknown edit kind {kind!r}; choose from {EDIT_KINDS}")


def misspell_word(word: str, rng: random.Random) -> tuple[str, str]:
    """One realistic misspelling of an alphabetic ``word`` (length ≥ 2): ``(new word, edit kind)``."""
    kinds = list(EDIT_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        new = _apply(word, kind, rng)
        if new is not None and new != word:
            return new, kind
    raise AssertionError(f"no edit changes {word!r}")  # unreachable: drop always changes a word of length ≥ 2


def _seeded_order(items: Iterable[int], seed: str) -> list[int]:
    """``items`` in one seeded random order: a rate's picks are its first ``k``, so a lower rate's are among a
    higher one's (``random.sample``'s picks for two ``k`` are not: it switches methods with ``k``)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def eligible_words(text: str) -> list[re.Match[str]]:
    """The words :func:`misspell_text` may edit: runs of ≥ 2 ASCII letters not glued to digits or letters (of any
    script), nor followed by a combining accent."""
    return list(WORD_RE.finditer(text))


def misspell_edits(text: str, rate: float, seed: int | str) -> tuple[str, list[Edit]]:
    """Misspell ``round(rate × eligible words)`` words chosen with ``seed``; return the text and the edits."""
    _check_rate(rate)
    words = eligible_words(text)
    k = round_half_up(rate * len(words))
    chosen = sorted(_seeded_order(range(len(words)), f"misspell:{seed}")[:k])
    pieces, edits, last = [], [], 0
    for i in chosen:
        m = words[i]
        new, kind = misspell_word(m.group(), random.Random(f"misspell:{seed}:{i}"))  # the same edit at every rate
        pieces += [text[last:m.start()], new]
        edits.append(Edit(m.start(), m.group(), new, kind))
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), edits


def misspell_text(text: str, rate: float, seed: int | str) -> str:
    """``text`` with ``rate`` of its eligible words misspelled (exactly ``round(rate × n)``; seeded)."""
    return misspell_edits(text, rate, seed)[0]


def sentence_span(record: dict, context: str) -> tuple[int, int] | None:
    """Where the record's ``sentence`` stands in its ``context`` (its first occurrence as whole words, with or
    without its final full stop, as templates quote it, with any whitespace between its words), or None when the
    record names none or it is not there."""
    sentence = record.get("sentence")
    if not isinstance(sentence, str) or not sentence.strip():
        return None
    for candidate in dict.fromkeys((sentence.strip(), sentence.strip().rstrip(".").rstrip())):
        if not candidate:
            continue  # its words in order, any whitespace between them (a line break, a doubled space)
        m = re.search(r"(?<![^\W_])" + r"\s+".join(map(re.escape, candidate.split())) + r"(?![^\W_])", context)
        if m:
            return m.span()
    return None


def misspell_record(record: dict, rate: float, seed: int | str, fields: Sequence[str] = ("context",)) -> dict:
    """A copy of ``record`` with ``fields`` misspelled (per field seed: seed, record id, field name).

    A phenotype record's context also holds its question; when the record names its ``sentence`` and that sentence
    occurs in the context, only the sentence is misspelled there (the question and the framing stay as written).
    The copy gains ``noise = {"kind": "misspell", "rate", "words", "eligible"}``: words actually misspelled, and the
    eligible words of the text they were drawn from.
    """
    out = dict(record)
    n = eligible = 0
    for name in fields:
        text = record.get(name)
        if not isinstance(text, str):
            continue
        field_seed = f"{seed}:{record.get('id', '')}:{name}"
        span = sentence_span(record, text) if name == "context" else None
        if span is not None:
            at, end = span
            noisy, edits = misspell_edits(text[at:end], rate, field_seed)
            out[name] = text[:at] + noisy + text[end:]
            eligible += len(eligible_words(text[at:end]))
        else:
            out[name], edits = misspell_edits(text, rate, field_seed)
            eligible += len(eligible_words(text))
        n += len(edits)
    out["noise"] = {"kind": "misspell", "rate": rate, "words": n, "eligible": eligible}
    return out


# ---------------------------------------------------------------- counterfactual phenotype labels

# Entities of every CancerLLM entity type, used when the records themselves offer no absent candidate.
FALLBACK_ENTITIES: dict[str, tuple[str, ...]] = {
    "tumor_size": ("2.3 cm", "14 mm", "3.1 x 2.4 cm"),
    "histological_type": ("invasive ductal carcinoma", "mucinous carcinoma", "tubular carcinoma"),
    "receptor_type": ("er, pr", "her2", "androgen receptor"),
    "receptor_status": ("er-", "pr+", "her2 equivocal"),
    "tumor_laterality": ("left", "right", "bilateral"),
    "cancer_stage": ("stage iiia", "pt1cn0", "stage ib"),
    "tumor_site": ("upper outer quadrant", "retroareolar", "axillary tail"),
    "cancer_grade": ("grade 2", "nottingham grade 3", "poorly differentiated"),
}


def _split(label: str) -> list[str]:
    return [a.strip() for a in label.split(",") if a.strip()]


def scorer_words(text: str) -> tuple[str, ...]:
    """``text`` as the scorer sees it: lower-cased, ASCII punctuation removed, Porter-stemmed words."""
    from cancerllm_jax.eval.protocol import normalize

    return tuple(normalize(text).split())


def _not_relevant(label: str) -> bool:
    """True for ``Not relevant`` as the scorer sees it (``not relevant``, ``Not Relevant.``)."""
    return scorer_words(label) == scorer_words(NOT_RELEVANT)


def _occurs(item: tuple[str, ...], words: tuple[str, ...]) -> bool:
    return any(words[i:i + len(item)] == item for i in range(len(words) - len(item) + 1))


def _views(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``text``'s words as the scorer sees them, and with ASCII punctuation read as a space (``ER+/PR+`` holds
    ``er`` and ``pr``, not only ``erpr``)."""
    return scorer_words(text), scorer_words(text.translate(_PUNCT_TO_SPACE))


def _absent(label: str, views: tuple[tuple[str, ...], ...]) -> bool:
    """True when no comma-separated item of ``label`` occurs, as the scorer normalises it (so ``er+`` is present in
    "ER positive") or with punctuation read as spaces, as a run of whole words in any of ``views`` (of the text);
    an item that normalises to nothing is never absent."""
    items = [_views(item) for item in _split(label)]
    return bool(items) and all(item[0] and not any(_occurs(i, w) for i in item if i for w in views)
                               for item in items)


def entity_type(record: dict) -> str | None:
    """A phenotype record's entity type (``entity_type``, else ``answer_type``), or None when it names none."""
    etype = record.get("entity_type") or record.get("answer_type")
    return str(etype) if etype else None


UNTYPED = ""  # the pool key of labels whose records name no entity type


def entity_pool(records: Iterable[dict]) -> dict[str, list[str]]:
    """Entity type → the distinct labels seen in ``records`` (first-seen order), ``Not relevant`` in any case
    left out; labels of records that name no type are pooled under ``UNTYPED`` (``""``)."""
    pool: dict[str, dict[str, None]] = {}
    for r in records:
        label = str(r.get("response", "")).strip()
        if label and not _not_relevant(label):
            pool.setdefault(entity_type(r) or UNTYPED, {})[label] = None
    return {t: list(v) for t, v in pool.items()}


def _wrong_label(record: dict, pool: dict[str, list[str]], rng: random.Random) -> tuple[str, str]:
    """(wrong label, kind) for one record; the label is absent from its sentence and context.

    A record of a known type gets, with equal odds, a label of its own type or of another; a ``Not relevant``
    record gets a label of any type. A record that names no type gets one of the data's own labels of any type
    (kind ``other_label``, or ``not_relevant_swap``; the built-in ``FALLBACK_ENTITIES`` only when none of them is
    absent from its sentence).
    """
    words = _views(f"{record.get('sentence', '')}\n{record.get('context', '')}")
    gold = str(record.get("response", "")).strip()
    etype = entity_type(record)
    types = sorted(set(pool) | set(FALLBACK_ENTITIES))
    typed = [t for t in types if t != UNTYPED]
    if _not_relevant(gold):  # a typed record's labels are typed ones (an untyped label may be of any type)
        kinds = types if etype is None else typed
        order = [("not_relevant_swap", t) for t in rng.sample(kinds, len(kinds))]
        if etype is None:  # its type unknown: the data's own labels first
            order = [("not_relevant_swap", None)] + order
    elif etype is None:  # its type unknown: any of the data's labels, then the built-in ones
        order = [("other_label", None)] + [("other_type", t) for t in rng.sample(typed, len(typed))]
    else:  # other types: known ones (an untyped label may be of this very type)
        others = [t for t in typed if t != etype]
        first = ("same_type", etype) if rng.random() < 0.5 else ("other_type", rng.choice(others))
        order = [first] + [("same_type", etype)] + [("other_type", t) for t in rng.sample(others, len(others))]
    gold_items = {scorer_words(a) for a in _split(gold)}  # a candidate sharing a normalised item would score as right
    own = list(dict.fromkeys(c for labels in pool.values() for c in labels))
    for kind, t in order:
        offered = own if t is None else pool.get(t, []) + list(FALLBACK_ENTITIES.get(t, ()))
        candidates = [c for c in offered
                      if _absent(c, words) and not gold_items & {scorer_words(a) for a in _split(c)}]
        if candidates:
            return rng.choice(candidates), kind
    raise ValueError(f"record {record.get('id')}: no entity absent from its sentence")  # pragma: no cover


def corrupt_phenotype_labels(records: Sequence[dict], rate: float, seed: int | str) -> tuple[list[dict], list[str]]:
    """Give ``round(rate × n)`` phenotype records (seeded choice) a wrong label absent from their sentence.

    Returns ``(new_records, corrupted ids)``; other records are copied unchanged. A corrupted record keeps its
    original label under ``counterfactual = {"original", "kind"}`` with kind ``same_type``, ``other_type``,
    ``not_relevant_swap`` or, for a record that names no entity type, ``other_label``.
    """
    _check_rate(rate)
    idx = [i for i, r in enumerate(records) if r.get("task", "phenotype") == "phenotype"]
    k = round_half_up(rate * len(idx))
    chosen = set(_seeded_order(idx, f"counterfactual:{seed}")[:k])
    pool = entity_pool(records[i] for i in idx)
    out, ids = [], []
    for i, r in enumerate(records):
        r = dict(r)
        if i in chosen:
            label, kind = _wrong_label(r, pool, random.Random(f"counterfactual:{seed}:{i}:{r.get('id', '')}"))
            r["counterfactual"] = {"original": r.get("response"), "kind": kind}
            r["response"] = label
            ids.append(str(r.get("id", i)))
        out.append(r)
    return out, ids
