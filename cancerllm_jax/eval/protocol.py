"""CancerLLM's scoring protocol (``docs/eval_protocol.md``): EM, BLEU-2, ROUGE-L by soft set matching.

Two protocols share the answer splitting, normalisation and soft set matching, and differ in the pair metrics:

- ``standard``: ROUGE-L from ``rouge-score`` (β = 1) and sentence BLEU-2 from ``sacrebleu`` (effective order);
- ``reference``: the authors' published choices, a unigram-*set* F-measure with β = 1.2 and COCO-style BLEU-2.

Heavy libraries (nltk, rouge-score, sacrebleu) are imported on first use; nothing here imports jax.
"""
from __future__ import annotations

import functools
import logging
import math
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cancerllm_jax.errors import UserTypeError, UserValueError, refuse_unknown_arguments

PROTOCOLS = ("standard", "reference")
METRICS = ("em", "bleu2", "rougeL")
KEYS = tuple(f"{m}_{x}" for m in METRICS for x in ("p", "r", "f1")) + ("avg_f1",)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_TINY, _SMALL = 1e-15, 1e-9  # the COCO BLEU scorer's smoothing constants
_BETA = 1.2  # the COCO "ROUGE" β

PairFn = Callable[[str, str], float]


# ---------------------------------------------------------------- text → answers


def split_answers(text: str) -> list[str]:
    """Split a response on commas; strip each item and drop empty ones."""
    return [item.strip() for item in text.split(",") if item.strip()]


def dedupe(items: Sequence[str]) -> list[str]:
    """Drop repeated items, keeping the first occurrence's order."""
    return list(dict.fromkeys(items))


@functools.cache
def _stemmer() -> Any:
    from nltk.stem.porter import PorterStemmer  # the class rouge-score's tokenizer uses, in the same default mode

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(token: str) -> str:
    return _stemmer().stem(token)


@functools.lru_cache(maxsize=1 << 16)
def normalize(answer: str) -> str:
    """Lower-case, remove ASCII punctuation, collapse whitespace, Porter-stem every token, join with spaces."""
    tokens = answer.lower().translate(_PUNCT_TABLE).split()
    return " ".join(stem for stem in map(_stem, tokens) if stem)


# ---------------------------------------------------------------- pair metrics on normalised strings


def exact_match(gold: str, pred: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(gold == pred)


class _WhitespaceTokenizer:
    """rouge-score's default tokenizer drops every non-``[a-z0-9]`` character; ours keeps normalised tokens intact."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())


@functools.cache
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=2, effective_order=True, tokenize="none")


def _unit(x: float) -> float:
    """Clamp float noise (sacrebleu returns 100.00000000000004 for a perfect match) into [0, 1]."""
    return min(1.0, max(0.0, x))


@functools.lru_cache(maxsize=1 << 16)
def rouge_l(gold: str, pred: str) -> float:
    """ROUGE-L F-measure (β = 1) over whitespace tokens, from rouge-score."""
    return _unit(_rouge_scorer().score(gold, pred)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=1 << 16)
def bleu2_sacrebleu(gold: str, pred: str) -> float:
    """Sentence BLEU-2 from sacrebleu (effective order, exponential smoothing) as a fraction."""
    return _unit(_bleu().sentence_score(pred, [gold]).score / 100.0)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@functools.lru_cache(maxsize=1 << 16)
def bleu2_coco(gold: str, pred: str) -> float:
    """COCO-style BLEU-2 of one pair: (p1·p2)^½ with 1e-15/1e-9 smoothing, times the brevity penalty."""
    hyp, ref = pred.split(), gold.split()
    bleu = 1.0
    for n in (1, 2):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        clipped = sum(min(count, r[gram]) for gram, count in h.items())
        bleu *= (clipped + _TINY) / (max(len(hyp) - n + 1, 0) + _SMALL)
    bleu **= 0.5
    ratio = (len(hyp) + _TINY) / (len(ref) + _SMALL)
    if ratio < 1:
        bleu *= math.exp(1 - 1 / ratio)
    return bleu


def rouge_unigram_set(gold: str, pred: str, beta: float = _BETA) -> float:
    """The published "ROUGE": F-beta of the overlap of the sets of prediction and gold tokens."""
    cand, ref = set(pred.split()), set(gold.split())
    common = len(cand & ref)
    if not common:
        return 0.0
    p, r = common / len(cand), common / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


_PAIR_METRICS: dict[str, dict[str, PairFn]] = {
    "standard": {"em": exact_match, "bleu2": bleu2_sacrebleu, "rougeL": rouge_l},
    "reference": {"em": exact_match, "bleu2": bleu2_coco, "rougeL": rouge_unigram_set},
}


def match(metric: PairFn, gold: str, pred: str) -> float:
    """Score one (gold, prediction) pair of normalised answers: 1 if both empty, 0 if one is, else ``metric``."""
    if not gold or not pred:
        return float(not gold and not pred)
    return metric(gold, pred)


def soft_prf(golds: Sequence[str], preds: Sequence[str], metric: PairFn) -> tuple[float, float, float]:
    """Precision, recall, F1 of normalised answer lists by soft set matching (section 4 of the protocol)."""
    if not golds and not preds:
        return 1.0, 1.0, 1.0
    if not golds:
        return 0.0, 1.0, 0.0
    if not preds:
        return 1.0, 0.0, 0.0
    table = [[match(metric, g, p) for p in preds] for g in golds]
    precision = sum(max(row[j] for row in table) for j in range(len(preds))) / len(preds)
    recall = sum(max(row) for row in table) / len(golds)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ---------------------------------------------------------------- instances and test sets


def _check_protocol(protocol: str) -> dict[str, PairFn]:
    if protocol not in _PAIR_METRICS:
        raise UserValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    return _PAIR_METRICS[protocol]


def score_instance(gold: str, pred: str, protocol: str = "standard") -> dict[str, float]:
    """One instance's P/R/F1 for every metric and its Average F1, in percent."""
    metrics = _check_protocol(protocol)
    golds = [normalize(a) for a in split_answers(gold)]
    preds = [normalize(a) for a in dedupe(split_answers(pred))]
    row: dict[str, float] = {}
    for name, fn in metrics.items():
        p, r, f1 = soft_prf(golds, preds, fn)
        row.update({f"{name}_p": 100 * p, f"{name}_r": 100 * r, f"{name}_f1": 100 * f1})
    row["avg_f1"] = sum(row[f"{m}_f1"] for m in METRICS) / len(METRICS)
    return row


PROMPT_OPENINGS = ("Below is an instruction", "### Instruction:", "### Input:", "### Response:")
RESPONSE_HEADER = "### Response:"


def generated_text(prediction: str) -> str:
    """What the protocol scores of a prediction in another generator's file (``score_file``; ours, with a
    ``prompt_hash``, hold the generation alone): a whole decoded text that starts with
    its prompt (another generator's output, prompt and all) gives the text after the ``### Response:`` that closes
    its prompt, the first one after the prompt's last ``Below is an instruction`` (each few-shot exemplar has its
    own); any other prediction is the generation itself, returned as it is (the same object), a made-up
    ``### Response:`` in it included."""
    if not prediction.lstrip().startswith(PROMPT_OPENINGS) or RESPONSE_HEADER not in prediction:
        return prediction
    last_prompt = max(prediction.rfind(PROMPT_OPENINGS[0]), 0)
    _, header, answer = prediction[last_prompt:].partition(RESPONSE_HEADER)
    return answer if header else prediction.partition(RESPONSE_HEADER)[2]


def score(
    golds: Sequence[str], preds: Sequence[str], protocol: str = "standard", per_instance: bool = False, **unknown
) -> dict[str, Any]:
    """Score a test set: each of ``KEYS`` is the mean over instances in percent, plus ``n`` (and ``rows``)."""
    refuse_unknown_arguments("score", unknown, score, {})  # the nearest known name, as load() and generate() say it
    _check_protocol(protocol)
    for name, value in (("golds", golds), ("preds", preds)):  # a dict would be scored by its keys
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            what = "string" if isinstance(value, str) else type(value).__name__
            raise UserTypeError(f"score() takes lists of strings, one gold and one prediction per instance, not a "
                                f"{what} ({name})")
    golds, preds = list(golds), list(preds)  # a generator is read once
    if len(golds) != len(preds):
        raise UserValueError(f"golds and preds differ in length: {len(golds)} golds, {len(preds)} predictions")
    if not golds:
        raise UserValueError("nothing to score: golds and preds are empty")
    rows: list[dict[str, Any]] = []
    for i, (g, p) in enumerate(zip(golds, preds, strict=True)):
        if not isinstance(g, str) or not isinstance(p, str):
            raise UserTypeError(f"instance {i}: gold and prediction must be strings, got {type(g).__name__}, "
                            f"{type(p).__name__}")
        rows.append({"index": i, "gold": g, "prediction": p, **score_instance(g, p, protocol)})
    result: dict[str, Any] = {k: sum(row[k] for row in rows) / len(rows) for k in KEYS}
    result["n"] = len(rows)
    if per_instance:
        result["rows"] = rows
    return result


# ---------------------------------------------------------------- JSONL files

Row = tuple[int, dict[str, Any]]  # (1-based line number, the JSON object)


def _read_jsonl(path: str) -> list[Row]:
    """The JSON objects of a JSONL file with their line numbers; blank lines are skipped."""
    from cancerllm_jax.data.sources import (decode_utf8, json_problem, json_type_name, loads_json_line,
                                            require_file)
    from cancerllm_jax.errors import UserError

    require_file(path)  # "is a folder; give a file" / "no such file", as every reader says it
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    lines = decode_utf8(path, data).split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
    rows: list[Row] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = loads_json_line(line)
        except (ValueError, RecursionError) as e:  # a key given twice, nested too deeply, a 4300+ digit integer
            raise UserError(f"{path}:{number}: {json_problem(e, 'not valid JSON')}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {json_type_name(obj)}")
        if "id" in obj and obj["id"] is None:  # a null id is no id, as the task runner reads test records
            del obj["id"]
        rows.append((number, obj))
    if not rows:
        raise UserError(f"{path}: empty file, no JSON lines to score")
    return rows


def _text_field(path: str, row: Row, name: str, hint: str = "") -> str:
    from cancerllm_jax.data.sources import json_type_name
    from cancerllm_jax.errors import UserError

    number, obj = row
    if name not in obj:
        raise UserError(f"{path}:{number}: missing field '{name}' (fields: {', '.join(obj) or 'none'}){hint}")
    value = obj[name]
    if not isinstance(value, str):
        raise UserError(f"{path}:{number}: field '{name}' must be a string, got {json_type_name(value)}")
    return value


def rows_by_id(path: str, rows: list[Row], implicit: bool = False) -> dict[str, Row] | None:
    """Rows keyed by ``id`` when every row has one, None when none has; mixed or duplicate ids are errors.
    ``implicit``: a row without an id is keyed ``line<N>``, as ``evaluate.py run`` names such test records."""
    from cancerllm_jax.data.sources import json_type_name
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.tasks import line_id

    with_id = [row for row in rows if "id" in row[1]]
    if not with_id and not implicit:
        return None
    if len(with_id) != len(rows) and not implicit:
        number = next(n for n, obj in rows if "id" not in obj)
        raise UserError(f"{path}:{number}: missing 'id' (other lines have one: give every line an id, or none)")
    keyed: dict[str, Row] = {}
    for number, obj in rows:
        key = obj.get("id", line_id(number))
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise UserError(f"{path}:{number}: 'id' must be a string or an integer, got {json_type_name(key)}")
        if str(key) in keyed:
            first, first_obj = keyed[str(key)]
            named = "" if "id" in first_obj else ", a line without an id, named so by its number"
            named += "" if "id" in obj else "; this line has no id and is named so by its number"
            raise UserError(f"{path}:{number}: duplicate id {key!r} (first on line {first}{named})")
        keyed[str(key)] = (number, obj)
    return keyed


GOLD_FIELDS = ("response", "gold", "answer", "output", "reference", "target")  # a gold file's, in this order
PRED_FIELDS = ("prediction", "pred", "generation", "generated", "output", "response")  # a prediction file's


def _field(path: str, rows: list[Row], given: str | None, candidates: tuple[str, ...], what: str,
           not_this: str | None = None) -> str:
    """``given``, else the first of ``candidates`` the file's first line has (said, when not the first candidate),
    passing over ``not_this`` (the gold file's field: a prediction file that kept its input record holds the gold
    under that name) while another is there; with none there, the first candidate (its missing-field error lists the
    line's fields)."""
    if given:
        return given
    present = [c for c in candidates if c in rows[0][1]]
    found = next((c for c in present if c != not_this), present[0] if present else candidates[0])
    if found != candidates[0]:
        logging.getLogger(__name__).warning("%s: no '%s' field; scoring its '%s' field as the %s (--%s-field to "
                                            "choose)", path, candidates[0], found, what, what[:4])
    return found


def _pairs(gold_path: str | None, pred_path: str, preds: list[Row], gold_field: str | None, pred_field: str | None
           ) -> list[tuple[Any, str, str]]:
    """(id or None, gold, prediction) per instance, in gold-file order (``preds``: the prediction file's rows)."""
    from cancerllm_jax.errors import UserError

    pred_ids = rows_by_id(pred_path, preds)
    if gold_path is None:  # a runner's output file: {id, prompt_hash, gold, prediction}
        hint = "" if gold_field else "; predictions without their gold answers are scored against the gold file: --gold"
        pred_field = _field(pred_path, preds, pred_field, PRED_FIELDS[:-1], "prediction",  # 'response' may be gold
                            not_this=gold_field or "gold")
        return [(obj.get("id"), _text_field(pred_path, row, gold_field or "gold", hint),
                 _text_field(pred_path, row, pred_field)) for row in preds for obj in [row[1]]]
    golds = _read_jsonl(gold_path)
    gold_field = _field(gold_path, golds, gold_field, GOLD_FIELDS, "gold")
    pred_field = _field(pred_path, preds, pred_field, PRED_FIELDS, "prediction", not_this=gold_field)
    some_ids = pred_ids is not None and any("id" in obj for _, obj in golds)  # a line without one is line<N>,
    gold_ids = rows_by_id(gold_path, golds, implicit=some_ids)  # as `evaluate.py run` names it
    if gold_ids is None and pred_ids is not None:  # a gold line without an id is line<N>, as `run` and generate.py
        named = rows_by_id(gold_path, golds, implicit=True)  # name it; predictions named otherwise pair by line
        gold_ids = named if set(named) & set(pred_ids) else None
        if gold_ids is None:
            logging.getLogger(__name__).warning(
                "%s has ids but %s has none, and no id is line<N> (a gold line's name): paired by line order",
                pred_path, gold_path)
    if gold_ids is not None and pred_ids is not None:
        for key, (number, obj) in gold_ids.items():
            if key not in pred_ids:
                how = "" if "id" in obj else " (a line without an id is named line<N>, as `evaluate.py run` names it)"
                raise UserError(f"{gold_path}:{number}: id {key!r} has no prediction in {pred_path}{how}")
        for key, (number, _) in pred_ids.items():
            if key not in gold_ids:
                raise UserError(f"{pred_path}:{number}: id {key!r} is not in {gold_path}")
        pairs = [(row[1].get("id", key), _text_field(gold_path, row, gold_field),
                  _text_field(pred_path, pred_ids[key], pred_field)) for key, row in gold_ids.items()]
        _warn_other_gold(gold_path, pred_path, [(row, pred_ids[key]) for key, row in gold_ids.items()], gold_field,
                         pred_field)
        return pairs
    if len(golds) != len(preds):
        raise UserError(f"{gold_path} has {len(golds)} lines but {pred_path} has {len(preds)}; without ids on both "
                        "sides they are matched by line order and must have equal counts")
    if gold_ids is not None:
        logging.getLogger(__name__).warning("%s has ids but %s has none: paired by line order", gold_path, pred_path)
    pairs = [(g[1].get("id"), _text_field(gold_path, g, gold_field), _text_field(pred_path, p, pred_field))
             for g, p in zip(golds, preds, strict=True)]
    _warn_other_gold(gold_path, pred_path, list(zip(golds, preds, strict=True)), gold_field, pred_field)
    return pairs


def _warn_other_gold(gold_path: str, pred_path: str, matched: list[tuple[Row, Row]], gold_field: str,
                     pred_field: str) -> None:
    """Prediction lines that carry a gold answer of their own (``gold``, or the gold file's field, as a runner's
    output or a kept input record holds it) other than the gold file's answer for the same instance: scored against
    the gold file, as asked, but counted in a warning naming the first (file, line, id; never the text, which may be
    a patient's)."""
    names = [name for name in dict.fromkeys(("gold", gold_field)) if name != pred_field]
    other = [(p, name) for (_, g), p in matched for name in names
             if p[1].get(name) is not None and (not isinstance(p[1][name], str)
                                                or p[1][name].strip() != g[gold_field].strip())]
    if not other:
        return
    (number, obj), name = other[0]
    instances = len({p[0] for p, _ in other})
    named = f", id {obj['id']!r}" if "id" in obj else ""
    logging.getLogger(__name__).warning(
        "%s: %d of %d prediction lines carry a '%s' answer other than %s's for the same instance (first: line %d%s): "
        "scored against %s; check that the two files belong together", pred_path, instances, len(matched), name,
        gold_path, number, named, gold_path)


def score_file(
    gold_path: str | None = None,
    pred_path: str | None = None,
    protocol: str = "standard",
    gold_field: str | None = None,
    pred_field: str | None = None,
    per_instance: bool = False,
    **unknown,
) -> dict[str, Any]:
    """Score a JSONL prediction file against a JSONL gold file, matched by ``id`` when both have ids (or the gold
    has none and the predictions are named ``line<N>``, as ``evaluate.py run`` names such records), else by line.

    ``gold_field`` defaults to ``response`` in a gold file (else the first of ``gold``, ``answer``, ``output``,
    ``reference``, ``target`` its first line has, said in a warning), ``pred_field`` to ``prediction`` (else
    ``pred``, ``generation``, ``generated``, ``output``, ``response``, never the gold file's field while another is
    there). With ``gold_path=None`` the prediction file
    carries its own gold answers in ``gold_field`` (default ``gold``, as ``evaluate.py run`` writes).
    Bad files raise ``UserError`` naming the file and line; rows (when asked for) carry the instance ``id``.
    ``gold=`` and ``pred=`` (the CLI's ``--gold`` / ``--pred``) name the same files.
    """
    from cancerllm_jax.errors import UserError, UserTypeError

    def alias(short: str, name: str, value):
        if short in unknown and value is not None:
            raise UserTypeError(f"score_file() got both {short}= and {name}=; give one")
        return unknown.pop(short, value)

    gold_path, pred_path = alias("gold", "gold_path", gold_path), alias("pred", "pred_path", pred_path)
    refuse_unknown_arguments("score_file", unknown, score_file, {})
    if pred_path is None:
        raise UserTypeError("score_file() needs the prediction file: score_file(gold_path, pred_path) or "
                            "score_file(pred_path=...) for a file that carries its own gold answers")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    preds = _read_jsonl(pred_path)
    pairs = _pairs(gold_path, pred_path, preds, gold_field, pred_field)
    if all("prompt_hash" in obj for _, obj in preds):
        # written by launch/generate.py, `evaluate.py run` or a robustness sweep: each prediction is the generated
        # text alone, scored as it stands (as `evaluate.py report` scores it), a header the model made included
        answers = [p for _, _, p in pairs]
    else:
        framed = sum(p.lstrip().startswith(PROMPT_OPENINGS) and RESPONSE_HEADER not in p for _, _, p in pairs)
        if framed:  # a prompt without its response header: nothing to cut at, scored as it stands, quietly low
            logging.getLogger(__name__).warning(
                "%d of %d predictions in %s start with a prompt ('Below is an instruction' or a '### ' header) that "
                "has no '### Response:': scored as they stand; give the answers alone (launch/generate.py writes them "
                "so)", framed, len(pairs), pred_path)
        answers = [generated_text(p) for _, _, p in pairs]
        cut = sum(a is not p for a, (_, _, p) in zip(answers, pairs))
        if cut:
            logging.getLogger(__name__).warning(
                "%d of %d predictions in %s hold their prompt (they start with 'Below is an instruction' or a '### ' "
                "header): each is scored on the text after the '### Response:' that closes its prompt, as the protocol "
                "takes a generation", cut, len(pairs), pred_path)
    result = score([g for _, g, _ in pairs], answers, protocol, per_instance)
    for row, (key, _, p) in zip(result.get("rows", []), pairs, strict=False):
        row["id"], row["prediction"] = key, p
    return result
