"""CancerLLM's robustness testbeds (paper §3.2, Tables 5 and 6) as sweeps over noise rates.

- :func:`counterfactual_sweep`: per rate, corrupt that share of the phenotype *training* labels
  (:func:`~cancerllm_jax.eval.noise.corrupt_phenotype_labels`), fine-tune one LoRA model with ``launch/finetune.py``
  (a subprocess, so each run is an ordinary, inspectable training run), and score it on the *clean* test set;
- :func:`misspelling_sweep`: per task and rate, misspell that share of the words of every test context
  (:func:`~cancerllm_jax.eval.noise.misspell_record`) and score one given model.

Both return rows (per rate: the EM / BLEU-2 / ROUGE-L precision, recall, F1 and the Average F1) and the mean Average
F1 over the rates; rate 0 may be given as a clean reference and is then left out of that mean. Each finished rate
leaves ``scores.json`` in its folder, holding the scores and every setting that produced them: the model's resolved
path and weights fingerprint (:func:`~cancerllm_jax.eval.runner.model_fingerprint`), the rate and noise seed, a
digest of the records used (so ``--limit``, ``--train-limit``, the data and the patients count), the decoding limits,
stop strings, dtype and protocol, and for the counterfactual sweep the epochs and fine-tuning overrides. A re-run
reuses a rate only when all of these match; when any differs the sweep stops before any work with an error naming the
differences (``overwrite=True`` / ``--overwrite`` recomputes such rates instead, replacing their results). A damaged
``scores.json`` is recomputed with a warning. A counterfactual rate whose fine-tuning was interrupted resumes that run
(its settings are kept in ``settings.json`` beside it; a run made with other training settings is refused, or started
again with ``--overwrite``); a finished run is reused when only the decoding settings changed.
:func:`write_outputs` writes ``table5.md`` / ``table6.md``, ``robustness.json`` and ``robustness.png``; a sweep that
computes any rate first takes its old table and ``robustness.json`` entry back (:func:`retract_outputs`).
Decoding is greedy with the paper's limits unless told otherwise; nothing here imports jax until a model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cancerllm_jax.errors import UserError
from cancerllm_jax.eval.noise import corrupt_phenotype_labels, entity_type, misspell_record, sentence_span
from cancerllm_jax.eval.protocol import score
from cancerllm_jax.eval.runner import (_ADDED_KEYS, adapter_fingerprint, differences, model_fingerprint,
                                       peak_memory, read_json_file, reset_peak_memory, tokenizer_sha256,
                                       tokenizer_spec)
from cancerllm_jax.eval.tasks import TaskSpec, get_task
from cancerllm_jax.train.run_io import write_text_atomic

COUNTERFACTUAL_RATES = (0.2, 0.4, 0.6, 0.8)
MISSPELLING_RATES = (0.02, 0.04, 0.06, 0.08, 0.2, 0.4, 0.6, 0.8)
METRIC_LABELS = (("em", "EM"), ("bleu2", "BLEU-2"), ("rougeL", "ROUGE-L"))
ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FORMAT = "cancerllm-jax/robustness-settings-v1"


@dataclass
class DecodeSettings:
    """Greedy decoding by default; ``None`` limits mean the paper's per-task limits."""

    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    batch_size: int = 8
    protocol: str = "standard"
    dtype: str = "float32"
    stop: tuple[str, ...] = ()  # the protocol: the output runs to EOS or the token limit, as evaluate.py run

    def spec(self, task: str) -> TaskSpec:
        """``task``'s evaluation spec (``evaluate.py run``'s) with these limits where they are set."""
        return get_task(task).with_limits(self.max_prompt_tokens, self.max_new_tokens)

    def limits(self, task: str) -> tuple[int, int]:
        spec = self.spec(task)
        return spec.max_input_tokens, spec.max_new_tokens

    def key(self, task: str) -> dict[str, Any]:
        """The settings that change ``task``'s scores (the batch size does not: decoding is greedy)."""
        max_in, max_new = self.limits(task)
        return {"max_prompt_tokens": max_in, "max_new_tokens": max_new, "stop": list(self.stop), "dtype": self.dtype,
                "protocol": self.protocol}


@dataclass
class SweepResult:
    """One sweep: its kind, rows (one per task and rate), the mean Average F1 per task and the settings."""

    kind: str
    rows: list[dict[str, Any]]
    mean_avg_f1: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "mean_avg_f1": self.mean_avg_f1, "settings": self.settings}


# ---------------------------------------------------------------- data


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write ``records`` atomically, one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def load_split(data: str, task: str, split: str, limit: int | None = None, patients: int = 60,
               seed: int = 0, required: bool = True) -> list[dict]:
    """The first ``limit`` records of ``task``'s ``split``, as ``evaluate.py run`` reads ``--data``: ``synthetic``
    (``patients`` patients, ``seed``) or ``synthetic:PATIENTS[:SEED]``, ``DIR/<task>/<split>.jsonl`` (a test split
    may also be ``DIR/<task>.jsonl``, or one JSONL file for one task). A split not ``required`` that the folder
    lacks is ``[]``."""
    from cancerllm_jax.eval.tasks import parse_synthetic, read_jsonl_records, test_split_path

    spec = parse_synthetic(data)
    if spec is not None:
        from cancerllm_jax.data.synthetic import instruction_datasets

        if data != "synthetic":  # synthetic:PATIENTS[:SEED] names its own patients (and seed, else --seed)
            patients, seed = spec[0], spec[1] if data.count(":") == 2 else seed
        records = instruction_datasets(patients, seed=seed)[task][split]
    elif split == "test":
        records = read_jsonl_records(test_split_path(task, data), task)  # as evaluate.py reads them
    else:
        path = Path(data) / task / f"{split}.jsonl"
        if not path.is_file() and not required and Path(data).is_dir():
            return []
        if not path.is_file():
            what = "a folder" if Path(data).is_dir() else "not a folder"
            raise UserError(f"{path} not found (--data {data} is {what}; the {split} split is read from "
                            "DIR/<task>/<split>.jsonl, e.g. from tools/make_synthetic_data.py)")
        records = read_jsonl_records(str(path), task)
    if not records:
        raise UserError(f"no {task} {split} records in {data}")
    return records[:limit] if limit else records


# ---------------------------------------------------------------- decoding and scoring


def load_model(path: str, dtype: str = "float32", adapter: str | None = None) -> Any:
    """``cancerllm_jax.load`` (imports jax), with a PEFT ``adapter`` folder on top if given."""
    import cancerllm_jax as cj

    lm = cj.load(path, dtype=dtype, adapter=adapter)
    if lm.tokenizer is None:
        raise UserError(f"{path}: no tokenizer found beside the weights")
    return lm


def decode(lm: Any, records: Sequence[dict], task: str,
           settings: DecodeSettings) -> tuple[list[str], dict, list[str]]:
    """Greedy predictions for ``records`` (the Alpaca generation prompt, context cut to fit, as ``evaluate.py run``
    builds it), decode stats (time, tokens, tokens/s, peak memory: the figures docs/eval_protocol.md's report
    holds, as ``evaluate.py run`` measures them), and each prompt's hash (``evaluate.py run``'s ``prompt_hash``)."""
    from cancerllm_jax.decode import generated_text
    from cancerllm_jax.eval.tasks import build_prompt

    spec = settings.spec(task)
    prompts = [build_prompt(lm.tokenizer, {**r, "id": r.get("id", i)}, spec) for i, r in enumerate(records)]
    reset_peak_memory()  # this rate's own host peak (an accelerator's stays the process's)
    t0 = time.perf_counter()
    outs = lm.generate([p.ids for p in prompts], max_new_tokens=spec.max_new_tokens,
                       max_prompt_tokens=spec.max_input_tokens, batch_size=settings.batch_size)
    seconds = time.perf_counter() - t0
    preds = [generated_text(lm.tokenizer, gen, lm.eos_ids, settings.stop).strip() for gen in outs]
    tokens = int(sum(len(g) for g in outs))
    memory, memory_kind = peak_memory()
    stats = {"seconds": round(seconds, 2), "generated_tokens": tokens,
             "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
             "peak_memory_bytes": memory, "memory_kind": memory_kind,
             "max_prompt_tokens": spec.max_input_tokens, "max_new_tokens": spec.max_new_tokens,
             "prompts_cut": sum(p.context_tokens_cut > 0 for p in prompts),
             "context_tokens_cut": sum(p.context_tokens_cut for p in prompts)}
    return preds, stats, [p.hash for p in prompts]


def score_predictions(records: Sequence[dict], preds: Sequence[str], protocol: str) -> dict[str, Any]:
    """The protocol's scores (percent) of ``preds`` against the records' responses."""
    return score([r["response"] for r in records], list(preds), protocol=protocol)


def _prediction_rows(records: Sequence[dict], preds: Sequence[str], hashes: Sequence[str]) -> list[dict]:
    return [{"id": r.get("id", i), "prompt_hash": h, "gold": r["response"], "prediction": p}
            for i, (r, p, h) in enumerate(zip(records, preds, hashes, strict=True))]


def evaluate_records(lm: Any, records: Sequence[dict], task: str, settings: DecodeSettings, out_dir: Path,
                     key: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode, score, and write ``predictions.jsonl`` + ``scores.json`` (the scores, ``extra`` and, under
    ``settings``, the ``key`` of what produced them) into ``out_dir``, each atomically; return the scores."""
    preds, stats, hashes = decode(lm, records, task, settings)
    result = {**score_predictions(records, preds, settings.protocol), **stats, **(extra or {})}
    write_jsonl(out_dir / "predictions.jsonl", _prediction_rows(records, preds, hashes))
    write_text_atomic(str(out_dir / "scores.json"), json.dumps({**result, "settings": key}, indent=2) + "\n")
    return result


def records_digest(records: Sequence[dict]) -> str:
    """A digest of records (what ``--limit``, the data and its seed select); the text itself is never stored."""
    text = json.dumps(list(records), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_key(model: str | Any, prefix: str = "model") -> dict[str, Any]:
    """The model's resolved path and weights fingerprint (a loaded LM: those of its source folder, of the base a
    training run reads, and of the PEFT adapter loaded on it, if any) and its tokenizer's content hash."""
    source = model if isinstance(model, str) else getattr(model, "source", None)
    if not isinstance(source, str) or not source:
        return {f"{prefix}_path": type(model).__name__, f"{prefix}_checkpoint_step": None, f"{prefix}_weights": None}
    fp = model_fingerprint(source)
    key = {f"{prefix}_path": fp["path"], f"{prefix}_checkpoint_step": fp["checkpoint_step"],
           f"{prefix}_weights": fp["weights"],
           f"{prefix}_tokenizer_sha256": tokenizer_sha256(tokenizer_spec(source, None))}
    if fp.get("base"):
        key[f"{prefix}_base"] = fp["base"]
    adapter = getattr(model, "adapter", None)  # a PEFT adapter loaded on top (``cj.load(..., adapter=)``)
    if isinstance(adapter, str):
        key[f"{prefix}_adapter"] = adapter_fingerprint(adapter)
    return key


_REDO = "use another --out, or pass --overwrite to recompute such rates (their old results are replaced)"


def _unrecorded_digest_matches(key: dict[str, Any], record: Path, name: str, saved: Path,
                               drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``key`` without its digest ``name`` when ``record`` (a ``scores.json`` or ``settings.json`` an earlier
    version wrote) does not hold that digest and the inputs saved beside it (``saved``, a JSONL file, its ``drop``
    fields aside) have it: results of the very inputs are reused, not refused for a key they predate."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        data = data.get("settings", data) if record.name == "scores.json" else data
        if not isinstance(data, dict) or name in data or name not in key:
            return key
        rows = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    except (OSError, ValueError, AttributeError):
        return key
    return {k: v for k, v in key.items() if k != name} if records_digest(rows) == key[name] else key


def _cached(out_dir: Path, key: dict[str, Any] | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The scores in ``out_dir/scores.json`` when they were computed with the settings ``key``; ``None`` when there
    are none to reuse (none, damaged — with a warning — or other settings with ``overwrite``). Other settings without
    ``overwrite`` raise ``UserError`` naming the differences."""
    path = out_dir / "scores.json"
    if not path.is_file():
        return None
    try:
        data = read_json_file(str(path), "cached result")
        if not isinstance(data, dict) or not isinstance(data.get("avg_f1"), (int, float)):
            raise UserError(f"{path}: not a scores.json this tool wrote (no 'avg_f1')")
    except UserError as e:
        log(f"warning: {e}; recomputing it")
        return None
    have = _canonical(data.pop("settings", None))
    if isinstance(have, dict) and key is not None:  # keys recorded since 2026-12-02: absent from older records
        key = {k: v for k, v in key.items() if k in have or not k.endswith(_ADDED_KEYS)}
    if key is None or have == key:
        return data
    if overwrite:
        log(f"{path}: computed with other settings; --overwrite: recomputing")
        return None
    what = (f"was computed with other settings: {'; '.join(differences(have, key))}" if isinstance(have, dict) else
            "holds no record of the settings that produced it (an older version wrote it)")
    raise UserError(f"{path} {what}. Reusing it would mix results of other settings into this table: {_REDO}")


def rate_dir(root: Path, rate: float) -> Path:
    """``rate_20`` for 20 %, ``rate_20.4`` for 20.4 % (to 12 significant digits, past which rates that differ
    would share a folder: ``launch/robustness.py`` refuses such a pair)."""
    pct = rate * 100
    return root / (f"rate_{round(pct):02d}" if abs(pct - round(pct)) < 1e-9 else f"rate_{pct:.12g}")


def mean_over_rates(rows: Sequence[dict], task: str) -> float | None:
    """Mean Average F1 of ``task`` over its noisy rates (rate 0, a clean reference, excluded); None without any."""
    vals = [r["avg_f1"] for r in rows if r["task"] == task and r["rate"] > 0]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------- the two sweeps


def _absolute(path: str | os.PathLike) -> str:
    """``path`` made absolute against this process's working folder (a name that is not a path is kept: a preset)."""
    from cancerllm_jax.train.config import absolute_path

    path = os.path.expanduser(str(path))
    return absolute_path(path) if os.path.exists(path) or os.sep in path else path


def finetune_command(base_model: str, train: Path, val: Path | None, workdir: Path, epochs: float,
                     overrides: Sequence[str] = (), resume: bool = False) -> list[str]:
    """The ``launch/finetune.py`` command line of one counterfactual run, with absolute paths (the subprocess may
    run in another folder); ``resume`` continues the run in ``workdir``; no ``val`` split: no held-out loss; a
    ``steps=N`` override sets the run's length instead of ``epochs`` (finetune.py refuses both)."""
    from cancerllm_jax.launch_common import given_at

    script = ROOT / "launch" / "finetune.py"
    if not script.is_file():
        raise UserError(f"{script} not found: the counterfactual sweep runs launch/finetune.py from a checkout")
    return [sys.executable, str(script), "--model", _absolute(base_model), "--data", _absolute(train),
            *(["--eval-data", _absolute(val)] if val is not None else []),
            *([] if given_at("steps", None, overrides, None) else ["--epochs", f"{epochs:g}"]),
            "--workdir", _absolute(workdir),
            *(["--resume"] if resume else []), *overrides]


def run_finetune(cmd: Sequence[str], log_path: Path) -> None:
    """Run one fine-tuning subprocess in this process's working folder (so relative paths in key=value overrides
    mean what they meant to the caller), its output appended to ``log_path``; a failure is a UserError with the
    run's own one-line ``error:`` (or, without one, how it ended and its last line)."""
    start = log_path.stat().st_size if log_path.exists() else 0  # earlier attempts' output stays in the log
    from cancerllm_jax.launch_common import run_child

    with open(log_path, "a", encoding="utf-8") as log:
        returncode = run_child(list(cmd), log, f"its fine-tuning run (log: {log_path})")
    if returncode != 0:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
        if error is None:
            how = f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}"
            error = f"{how}, no error line; last output: {lines[-1][:200] if lines else 'none'}"
        else:
            error = f"exit {returncode}: {error[:300]}"
        raise UserError(f"fine-tuning failed ({error}) (full log: {log_path})")


def canonical_overrides(overrides: Sequence[str]) -> list[str]:
    """``key=value`` overrides as a record compares them: the last one of each key, sorted by key (the same settings
    given in another order are the same run); as given where one key holds another (``lora={rank: 4}`` and
    ``lora.rank=8``: the command line refuses such a pair now, an older record may hold one)."""
    last = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        last[key.strip()] = f"{key.strip()}={value}"
    if any(a != b and b.startswith(a + ".") for a in last for b in last):
        return [str(o) for o in overrides]
    return [last[k] for k in sorted(last)]


def _canonical(settings):
    """A recorded settings dict with its overrides in ``canonical_overrides`` form (records written before it)."""
    if isinstance(settings, dict) and isinstance(settings.get("overrides"), list):
        return {**settings, "overrides": canonical_overrides(settings["overrides"])}
    return settings


def _read_settings(path: Path) -> dict[str, Any] | None:
    """A rate's ``settings.json`` (what its fine-tuning run was started with), or None when absent or damaged."""
    if not path.is_file():
        return None
    try:
        data = read_json_file(str(path), "record of the fine-tuning settings")
    except UserError:
        return None
    return data if isinstance(data, dict) else None


def _run_finished(run: Path) -> bool:
    """True when the training run in ``run`` has a checkpoint at its last step."""
    from cancerllm_jax.train import run_io

    try:
        steps = run_io.read_run_meta(str(run))["config"]["steps"]
        latest = run_io.latest_step(str(run / "checkpoints"))
    except (UserError, OSError, KeyError, TypeError):
        return False
    return isinstance(steps, int) and steps > 0 and latest is not None and latest >= steps


def _training_state(d: Path, train_key: dict[str, Any], overwrite: bool) -> str:
    """``"fresh"`` (no run yet, or one to start again with ``overwrite``), ``"resume"`` (an interrupted run made with
    ``train_key``) or ``"done"`` (a finished one); a run made with other settings is a ``UserError``."""
    run = d / "run"
    if not run.exists():
        return "fresh"
    have = _canonical(_read_settings(d / "settings.json"))
    if have == train_key:
        return "done" if _run_finished(run) else "resume"
    if overwrite:
        return "fresh"
    what = (f"made with other settings: {'; '.join(differences(have, train_key))}" if have is not None else
            f"with no readable record of its settings ({d / 'settings.json'})")
    raise UserError(f"{run}: a fine-tuning run {what}. Continuing it would mix them: {_REDO}")


def counterfactual_sweep(base_model: str, train: Sequence[dict], val: Sequence[dict], test: Sequence[dict],
                         out_dir: str | os.PathLike, rates: Sequence[float] = COUNTERFACTUAL_RATES,
                         epochs: float = 1.0, overrides: Sequence[str] = (), seed: int = 0,
                         settings: DecodeSettings | None = None,
                         trainer: Callable[[Sequence[str], Path], None] = run_finetune,
                         log: Callable[[str], None] = print, overwrite: bool = False) -> SweepResult:
    """Per rate: corrupt the training labels, fine-tune ``base_model``, score on the clean ``test`` set. A rate is
    reused, resumed or refused as the module doc says; every rate is checked before any is computed."""
    settings = settings or DecodeSettings()
    untyped = sum(entity_type(r) is None for r in train)
    if untyped and any(rate > 0 for rate in rates):
        log(f"warning: counterfactual: {untyped} of {len(train)} training records name no 'entity_type' (or "
            "'answer_type'): their wrong labels are drawn from all of the data's labels, whatever their type, and "
            "none is a same-type swap (add the field to choose within a type)")
    root = Path(out_dir) / "counterfactual"
    base = {"format": SETTINGS_FORMAT, "sweep": "counterfactual", **model_key(base_model, "base_model"),
            "seed": seed, "epochs": epochs, "overrides": canonical_overrides(overrides),
            "train_set": records_digest(train),
            "n_train": len(train), "val_set": records_digest(val), "n_val": len(val)}
    eval_key = {"test_set": records_digest(test), "n_test": len(test), **settings.key("phenotype")}
    plans = []
    for rate in rates:  # check every rate's cache and run first: a refusal comes before any work
        d = rate_dir(root, rate)
        corrupted = corrupt_phenotype_labels(train, rate, seed)
        train_key = {**base, "rate": rate, "corrupted_set": records_digest(corrupted[0])}
        key = {**train_key, **eval_key}
        saved = d / "train.jsonl"  # an earlier version's rate: its labels compared as saved
        result = _cached(d, _unrecorded_digest_matches(key, d / "scores.json", "corrupted_set", saved), overwrite, log)
        plans.append((rate, d, train_key, key, result, corrupted, None if result is not None else _training_state(
            d, _unrecorded_digest_matches(train_key, d / "settings.json", "corrupted_set", saved), overwrite)))
    if any(plan[4] is None for plan in plans):
        retract_outputs(out_dir, "counterfactual")
    if val:
        write_jsonl(root / "val.jsonl", val)
    else:
        log("[counterfactual] no validation split: the fine-tuning runs report no held-out loss")
    write_jsonl(root / "test.jsonl", test)
    rows = []
    for rate, d, train_key, key, result, (corrupted_records, ids), state in plans:
        d.mkdir(parents=True, exist_ok=True)
        if result is None:
            if state == "fresh":
                for stale in ("run", "scores.json", "settings.json"):
                    if (d / stale).is_dir():
                        shutil.rmtree(d / stale)
                    elif (d / stale).exists():
                        (d / stale).unlink()
            write_jsonl(d / "train.jsonl", corrupted_records)
            write_text_atomic(str(d / "corrupted_ids.json"), json.dumps(ids) + "\n")
            write_text_atomic(str(d / "settings.json"), json.dumps(train_key, indent=2) + "\n")
            extra = {}
            if state == "done":
                log(f"[counterfactual {rate:.0%}] reusing the finished fine-tuning run {d / 'run'}")
            else:
                cmd = finetune_command(base_model, d / "train.jsonl", root / "val.jsonl" if val else None, d / "run",
                                       epochs, overrides, resume=state == "resume")
                log(f"[counterfactual {rate:.0%}] {len(ids)}/{len(train)} labels corrupted; "
                    + ("resuming the interrupted fine-tuning run ..." if state == "resume" else "fine-tuning ..."))
                t0 = time.perf_counter()
                trainer(cmd, d / "finetune.log")
                extra["train_seconds"] = round(time.perf_counter() - t0, 1)
                log(f"[counterfactual {rate:.0%}] trained in {extra['train_seconds']:.0f} s")
            log(f"[counterfactual {rate:.0%}] scoring {len(test)} clean test examples")
            result = evaluate_records(load_model(str(d / "run"), settings.dtype), test, "phenotype", settings, d,
                                      key, extra)
        else:
            log(f"[counterfactual {rate:.0%}] reusing {d / 'scores.json'}")
        rows.append({"task": "phenotype", "rate": rate, "n_corrupted": len(ids), "n_train": len(train), **result})
        log(f"[counterfactual {rate:.0%}] Avg F1 {result['avg_f1']:.2f}")
    return SweepResult("counterfactual", rows, {"phenotype": mean_over_rates(rows, "phenotype")},
                       {"base_model": base_model, "epochs": epochs, "overrides": list(overrides), "seed": seed,
                        "rates": list(rates), "decode": vars(settings) | {"stop": list(settings.stop)},
                        "n_train": len(train), "n_val": len(val), "n_test": len(test)})


def _warn_question_misspelled(task: str, records: Sequence[dict], rates: Sequence[float],
                              log: Callable[[str], None]) -> None:
    """Warn when phenotype records do not name their ``sentence`` inside their context: their whole context, the
    question too, is misspelled (a record that does has only its sentence misspelled)."""
    if task != "phenotype" or not any(rate > 0 for rate in rates):
        return
    whole = sum(sentence_span(r, str(r.get("context", ""))) is None for r in records)
    if whole:
        log(f"warning: misspell phenotype: {whole} of {len(records)} test records name no 'sentence' found in their "
            "context, so their whole context is misspelled, the question too (give each record its 'sentence' to "
            "misspell only that)")


def _warn_short_texts(task: str, rate: float, noisy: Sequence[dict], same_as: float | None,
                      log: Callable[[str], None]) -> None:
    """Warn when ``rate`` leaves texts with words unmisspelled (round(rate × words) = 0: short texts), or gives the
    very inputs of a lower rate ``same_as``: the table's rate then says more than was done."""
    if rate <= 0:
        return
    if same_as is not None:
        log(f"warning: misspell {task}: rate {rate:.4g} misspells the very words of rate {same_as:.4g} (the texts "
            "are too short for the two rates to differ); its row repeats that rate's inputs")
    untouched = sum(r["noise"]["eligible"] > 0 and r["noise"]["words"] == 0 for r in noisy)
    if untouched:
        log(f"warning: misspell {task} {rate:.4g}: {untouched} of {len(noisy)} test texts have too few words for "
            f"one misspelling at this rate (round(rate x words) = 0); they are scored clean, and the share actually "
            "misspelled is in robustness.json and table6.md")


def misspelling_sweep(model: str | Any, tests: dict[str, Sequence[dict]], out_dir: str | os.PathLike,
                      rates: Sequence[float] = MISSPELLING_RATES, seed: int = 0,
                      settings: DecodeSettings | None = None, log: Callable[[str], None] = print,
                      overwrite: bool = False, adapter: str | None = None) -> SweepResult:
    """Per task and rate: misspell the test contexts, score ``model`` (a path, loaded once with the PEFT ``adapter``
    if given, or a loaded LM). A rate is reused only when its settings match (see the module doc); every rate is
    checked before any is computed."""
    settings = settings or DecodeSettings()
    for task, records in tests.items():  # a record without a context has nothing to misspell: its rows are clean
        bare = sum(not (isinstance(r.get("context"), str) and r["context"].strip()) for r in records)
        if bare == len(records) and any(rate > 0 for rate in rates):
            raise UserError(f"misspell {task}: none of the {len(records)} test records has a 'context', the only "
                            "field misspelled, so every rate would score the clean inputs (put the note in "
                            "'context')")
        if bare:
            log(f"warning: misspell {task}: {bare} of {len(records)} test records have no 'context'; they are "
                "scored unmisspelled at every rate")
    root = Path(out_dir) / "misspell"
    base = {"format": SETTINGS_FORMAT, "sweep": "misspell", **model_key(model), "seed": seed}
    if adapter is not None:
        base["model_adapter"] = adapter_fingerprint(adapter)
    plans = []
    for task, records in tests.items():
        _warn_question_misspelled(task, records, rates, log)
        seen: dict[str, float] = {}
        for rate in rates:
            d = rate_dir(root / task, rate)
            noisy = [misspell_record(r, rate, seed) for r in records]
            noisy_set = records_digest([{k: v for k, v in r.items() if k != "noise"} for r in noisy])  # the inputs
            _warn_short_texts(task, rate, noisy, seen.get(noisy_set), log)
            seen.setdefault(noisy_set, rate)
            key = {**base, "task": task, "rate": rate, "test_set": records_digest(records), "n_test": len(records),
                   "noisy_set": noisy_set, **settings.key(task)}
            seen_key = _unrecorded_digest_matches(key, d / "scores.json", "noisy_set", d / "test.jsonl", ("noise",))
            plans.append((task, noisy, rate, d, key, _cached(d, seen_key, overwrite, log)))
    if any(plan[5] is None for plan in plans):
        retract_outputs(out_dir, "misspell")
    lm = None
    rows = []
    for task, noisy, rate, d, key, result in plans:
        d.mkdir(parents=True, exist_ok=True)
        if result is None:
            write_jsonl(d / "test.jsonl", noisy)
            if lm is None:
                lm = load_model(model, settings.dtype, adapter) if isinstance(model, str) else model
            result = evaluate_records(lm, noisy, task, settings, d, key)
        words = sum(r["noise"]["words"] for r in noisy)
        eligible = sum(r["noise"]["eligible"] for r in noisy)
        share = words / eligible if eligible else 0.0
        rows.append({"task": task, "rate": rate, "misspelled_words": words, "eligible_words": eligible,
                     "misspelled_share": share, **result})
        log(f"[misspell {task} {rate:.0%}] {words} of {eligible} words misspelled ({share:.2%}); "
            f"Avg F1 {result['avg_f1']:.2f}")
    return SweepResult("misspell", rows, {t: mean_over_rates(rows, t) for t in tests},
                       {"model": model if isinstance(model, str) else getattr(model, "source", "LM"),
                        **({"adapter": adapter} if adapter else {}), "seed": seed,
                        "rates": list(rates), "decode": vars(settings) | {"stop": list(settings.stop)},
                        "n_test": {t: len(r) for t, r in tests.items()}})


# ---------------------------------------------------------------- tables, JSON and the plot


def _num(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _pct(rate: float) -> str:
    return f"{rate * 100:g}%" + (" (clean)" if rate == 0 else "")


TASK_WORDS = {"phenotype": "phenotype extraction", "diagnosis": "diagnosis generation",
              "treatment_plan": "treatment-plan generation"}


def table_markdown(result: SweepResult, model_name: str) -> str:
    """Table 5 (counterfactual) or Table 6 (misspellings) in the paper's layout, plus the mean Average F1."""
    number = "5" if result.kind == "counterfactual" else "6"
    tasks = list(dict.fromkeys(r["task"] for r in result.rows))
    named = " and ".join(TASK_WORDS.get(t, t.replace("_", " ")) for t in tasks)
    title = ("Counterfactual robustness on phenotype extraction (rate = share of wrongly labelled training "
             "instances; evaluated on the clean test set)" if number == "5" else
             f"Misspelling robustness on {named} (rate = share of the words of each test instance's context "
             "misspelled, counting words of two or more letters, rounded per instance: the column 'misspelled' "
             "gives the share of those words actually misspelled; a phenotype context's question is left as written "
             "when the record names its sentence; the fine-tuned model is scored on the misspelled inputs, not "
             "retrained)")
    misspell = number == "6"
    head = ["Task", "Model", "rate"] + (["misspelled"] if misspell else [])
    head += [f"{lab} {x}" for _, lab in METRIC_LABELS for x in ("P", "R", "F1")] + ["Avg F1", "n"]
    lines = [f"**Table {number}.** {title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for task in tasks:
        first = True
        for r in (r for r in result.rows if r["task"] == task):
            cells = [task.replace("_", " ") if first else "", model_name if first else "", _pct(r["rate"])]
            if misspell:
                share = r.get("misspelled_share")  # absent from rows of earlier versions
                cells.append("–" if share is None else f"{share * 100:.2f}%")
            cells += [f"{r[f'{m}_{x}']:.2f}" for m, _ in METRIC_LABELS for x in ("p", "r", "f1")]
            cells += [f"{r['avg_f1']:.2f}", str(r["n"])]
            lines.append("| " + " | ".join(cells) + " |")
            first = False
        avg = result.mean_avg_f1.get(task)
        mean = ["", "", "**mean over rates**"] + [""] * (9 + misspell) + ["–" if avg is None else f"**{avg:.2f}**", ""]
        lines.append("| " + " | ".join(mean) + " |")
    s = result.settings
    dec = s.get("decode", {})
    note = (f"Protocol `{dec.get('protocol', 'standard')}`; greedy decoding; limits "
            f"{dec.get('max_prompt_tokens') or 'paper'} in / {dec.get('max_new_tokens') or 'paper'} new tokens; "
            f"seed {s.get('seed')}. Scores in percent; rate 0 is a clean reference, not part of the mean.")
    lines += ["", note]
    head = ["Task", "rate", "Generation time (s)", "Tokens/s", "Peak memory (MiB)"]
    lines += ["", "Per rate (docs/eval_protocol.md, \"What a report holds\"): decoding the whole test set, compile "
              "included.", "",
              "| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|"]
    for r in result.rows:
        mem = r.get("peak_memory_bytes")
        cells = [r["task"].replace("_", " "), _pct(r["rate"]), _num(r.get("seconds"), "{:.2f}"),
                 _num(r.get("tokens_per_s"), "{:.1f}"), _num(None if mem is None else mem / 2**20, "{:,.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweeps(results: Sequence[SweepResult], path: str | os.PathLike, model_names: dict[str, str]) -> str:
    """F1 vs rate: one panel per (sweep, task), the three F1s dashed and the Average F1 bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(res, task) for res in results for task in dict.fromkeys(r["task"] for r in res.rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.3), squeeze=False)
    for ax, (res, task) in zip(axes[0], panels, strict=True):
        rows = sorted((r for r in res.rows if r["task"] == task), key=lambda r: r["rate"])
        x = list(range(len(rows)))  # evenly spaced: the paper's rates cluster below 10 %
        for key, label in METRIC_LABELS:
            ax.plot(x, [r[f"{key}_f1"] for r in rows], "--o", ms=4, lw=1.2, label=f"{label} F1")
        ax.plot(x, [r["avg_f1"] for r in rows], "-o", color="black", lw=2.4, label="Average F1")
        ax.set_xticks(x, [f"{r['rate'] * 100:g}%" for r in rows])
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        what = "wrong training labels" if res.kind == "counterfactual" else "misspelled words"
        ax.set_xlabel(f"rate of {what}")
        ax.set_ylabel("F1 (%)")
        ax.set_title(f"{res.kind}: {task.replace('_', ' ')}\n{model_names.get(res.kind, '')}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    from cancerllm_jax.eval.report import save_figure

    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return str(path)


def _table_path(out_dir: str | os.PathLike, kind: str) -> Path:
    return Path(out_dir) / ("table5.md" if kind == "counterfactual" else "table6.md")


def _read_merged(js: Path) -> dict:
    data = read_json_file(str(js), "merged results file", "delete it and run the sweeps again (their finished rates "
                          "are reused)") if js.is_file() else {}
    if not isinstance(data, dict):
        raise UserError(f"{js}: expected a JSON object; delete it and run the sweeps again")
    return data


def _redraw(out: Path, data: dict) -> str | None:
    """``robustness.png`` of every sweep in ``data`` (removed when there is none)."""
    if not data:
        (out / "robustness.png").unlink(missing_ok=True)
        return None
    results = [SweepResult(v["kind"], v["rows"], v["mean_avg_f1"], v["settings"]) for k, v in sorted(data.items())]
    return plot_sweeps(results, out / "robustness.png", {k: v.get("model_name", "") for k, v in data.items()})


def retract_outputs(out_dir: str | os.PathLike, kind: str) -> None:
    """Take the ``kind`` sweep's table and its entry in ``robustness.json`` (and the plot) back before any of its
    rates is recomputed: an interrupted sweep must not leave the old results looking current."""
    out = Path(out_dir)
    _table_path(out, kind).unlink(missing_ok=True)
    js = out / "robustness.json"
    data = _read_merged(js)
    if kind in data:
        del data[kind]
        if data:
            write_text_atomic(str(js), json.dumps(data, indent=2) + "\n")
        else:
            js.unlink()
        _redraw(out, data)


def write_outputs(out_dir: str | os.PathLike, result: SweepResult, model_name: str) -> dict[str, str]:
    """Merge this sweep into ``robustness.json``, redraw ``robustness.png`` from all sweeps recorded there, then
    write its table (last: a table is only there when everything it goes with is); return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _table_path(out, result.kind)
    table.unlink(missing_ok=True)  # an older table must not outlive a failure below
    js = out / "robustness.json"
    data = _read_merged(js)
    data[result.kind] = {**result.to_json(), "model_name": model_name}
    write_text_atomic(str(js), json.dumps(data, indent=2) + "\n")
    png = _redraw(out, data)
    write_text_atomic(str(table), table_markdown(result, model_name))
    return {"table": str(table), "json": str(js), "png": png}
