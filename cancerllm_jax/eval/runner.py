"""Run models on the evaluation tasks, side by side, and score them with the paper's protocol.

For every (model, task) the runner writes ``OUT/predictions/<model>__<task>.jsonl``, one row
``{id, prompt_hash, gold, prediction}`` per test instance, appended and flushed as each batch finishes, plus
``<model>__<task>.stats.jsonl`` with one line of timing/token/memory figures per decoded batch. A run that is
interrupted and started again with the same ``--out`` resumes: instances already in the prediction file are not
decoded again (their prompt hash must match the prompt built now, else it is an error). Beside each prediction file,
``<model>__<task>.produced_by.json`` records what made its rows: the model's resolved path and a weights fingerprint
(sizes and modification times of the weight files; a training run's checkpoint step and the fingerprint of the base it
was trained on), the task and every setting that changes the output (token limits, stop strings, prompt format and
shots, sampling settings, dtype, tokenizer and the sha256 of its files' content: prompt hashes are of the prompt text,
so a tokenizer that splits it otherwise is seen there). A run whose model or settings differ from that record is
refused (``overwrite=True`` / ``--overwrite`` discards such files and decodes again), so one file never mixes
predictions of two models or two decodings. ``OUT/metrics.json`` and ``OUT/report.md`` (with PNG plots) are written
at the end, with what an earlier run into ``OUT`` scored and this one did not redo (same data, decoding settings
and dtype, unchanged test records, same model and task settings, prediction file still there), so runs of one
task at a time build one report; ``rescore(OUT)`` rebuilds both from
the prediction files alone, without a model.

Efficiency figures per (model, task): generation wall time for the whole test split (summed over batches,
including any batch that compiled a new shape; ``steady_tokens_per_s`` leaves those out), generated tokens per
second, and peak memory — JAX ``peak_bytes_in_use`` of the device on GPU/TPU, the host's peak RSS on CPU. The
host's peak starts afresh for each task (``reset_peak_memory``); the device's is the process's high-water mark
(JAX cannot reset it), so there a later task's or model's figure is at least the earlier one's.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cancerllm_jax.data.sources import json_type_name
from cancerllm_jax.errors import UserError
from cancerllm_jax.eval.protocol import PROTOCOLS, score
from cancerllm_jax.eval.tasks import (TaskSpec, build_few_shot_prompt, build_prompt, describe_data, get_task,
                                     parse_synthetic, read_test_split, read_train_split)

PRED_FIELDS = ("id", "prompt_hash", "gold", "prediction")
PROVENANCE_FORMAT = "cancerllm-jax/eval-provenance-v1"
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ModelEntry:
    name: str
    path: str
    adapter: str | None = None  # a PEFT LoRA adapter folder loaded on top of ``path``


@dataclass
class Decoding:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    shots: int = 0  # k-shot prompting: k training exemplars (seeded per example) before each prompt

    def to_dict(self) -> dict[str, Any]:
        return {"greedy": self.temperature <= 0, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "seed": self.seed, "batch_size": self.batch_size, "shots": self.shots}


@dataclass
class RunConfig:
    models: list[ModelEntry]
    tasks: list[TaskSpec]
    data: str = "synthetic"
    out: str = "eval_out"
    limit: int | None = None
    protocol: str = "standard"
    decoding: Decoding = field(default_factory=Decoding)
    dtype: str = "float32"
    mesh: str = "1x1"
    tokenizer: str | None = None
    progress: bool = True
    overwrite: bool = False  # discard prediction files made by another model or with other settings


# ---------------------------------------------------------------- names and paths


def model_names(paths: Sequence[str], names: Sequence[str] | None = None,
                adapters: Sequence[str] | None = None) -> list[ModelEntry]:
    """Pair model paths with display names (default: the folder's base name, or the adapter's when one is given;
    repeats get a suffix) and PEFT adapters (one per model, ``none`` for the bare model)."""
    from cancerllm_jax.api import NO_ADAPTER, adapter_or_none

    names, adapters = list(names or []), list(adapters or [])
    if names and len(names) != len(paths):
        raise UserError(f"got {len(paths)} --model but {len(names)} --name; give one name per model or none")
    if adapters and len(adapters) != len(paths):
        raise UserError(f"got {len(paths)} --model but {len(adapters)} --adapter; give one adapter per model "
                        f"('{NO_ADAPTER}' for a model without one) or none")
    adapters = [adapter_or_none(a) for a in adapters] or [None] * len(paths)
    entries, used = [], set()
    for i, (path, adapter) in enumerate(zip(paths, adapters)):
        default = os.path.basename(os.path.normpath(adapter or path))
        name = names[i] if names else (default or f"model{i}")
        name = _NAME_RE.sub("-", name).strip("-.") or f"model{i}"  # no hidden files (.., .x)
        if name in used:
            if names:
                raise UserError(f"--name {name!r} given twice; model names must be unique")
            k = 2
            while f"{name}-{k}" in used:
                k += 1
            name = f"{name}-{k}"
        used.add(name)
        entries.append(ModelEntry(name, path, adapter))
    return entries


def pred_path(out: str, model: str, task: str) -> str:
    return os.path.join(out, "predictions", f"{model}__{task}.jsonl")


def stats_path(out: str, model: str, task: str) -> str:
    return os.path.join(out, "predictions", f"{model}__{task}.stats.jsonl")


def provenance_path(out: str, model: str, task: str) -> str:
    return os.path.join(out, "predictions", f"{model}__{task}.produced_by.json")


# ---------------------------------------------------------------- what produced a prediction file

_WEIGHT_NAMES = re.compile(r"(\.safetensors|\.model|\.json|\.txt|\.tiktoken)$")


def _files_digest(root: str, rels: Sequence[str]) -> str:
    """A cheap fingerprint of files: sha256 of their relative paths, sizes and modification times."""
    entries = []
    for rel in rels:
        full = os.path.join(root, rel)
        if os.path.isdir(full):
            for folder, dirs, files in os.walk(full):
                dirs.sort()
                for name in sorted(files):
                    st = os.stat(os.path.join(folder, name))
                    entries.append([os.path.relpath(os.path.join(folder, name), root), st.st_size, st.st_mtime_ns])
        elif os.path.isfile(full):
            st = os.stat(full)
            entries.append([rel, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def model_fingerprint(path: str) -> dict[str, Any]:
    """``{path, checkpoint_step, weights}``: the model folder's resolved path and a fingerprint of its weights — sizes
    and modification times of the weight, config and tokenizer files (a training run: ``run.json``, ``base/`` and
    its latest checkpoint, plus ``base``: the fingerprint of the model it was trained on when it reads that from its
    path). Cheap (no weight is read); a copy made without keeping modification times counts as other weights. A path
    that does not exist (a preset name) has ``weights: None``."""
    from cancerllm_jax.train import run_io

    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(real):
        return {"path": path if not os.path.exists(real) else real, "checkpoint_step": None, "weights": None}
    if run_io.is_run_dir(real):
        step = run_io.latest_step(os.path.join(real, "checkpoints"))
        rels = [run_io.RUN_FILE, "base"] + ([os.path.join("checkpoints", str(step))] if step is not None else [])
        fp = {"path": real, "checkpoint_step": step, "weights": _files_digest(real, rels)}
        base = run_io.read_run_meta(real).get("base") or {}
        if base.get("kind") == "path":  # the weights it was trained on, read from there at every load
            fp["base"] = model_fingerprint(base["path"])
        return fp
    rels = sorted(n for n in os.listdir(real) if _WEIGHT_NAMES.search(n) and not n.startswith("."))
    rels += [d for d in ("params", "lora") if os.path.isdir(os.path.join(real, d))]  # a converted checkpoint's trees
    return {"path": real, "checkpoint_step": None, "weights": _files_digest(real, rels)}


def adapter_fingerprint(path: str) -> dict[str, Any]:
    """``{path, weights}`` of a PEFT adapter folder, as ``model_fingerprint`` does it for a model."""
    from cancerllm_jax.checkpoint.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    real = os.path.realpath(os.path.expanduser(path))
    return {"path": real, "weights": _files_digest(real, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])}


_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.\w+|merges\.txt|"
                              r"config\.json|.*\.model|.*\.tiktoken)$")


def tokenizer_spec(path: str, tokenizer: str | None) -> str | None:
    """The tokenizer ``cancerllm_jax.load(path, tokenizer=tokenizer)`` uses, found without reading weights."""
    from cancerllm_jax.api import _tokenizer_in
    from cancerllm_jax.train import run_io

    real = os.path.expanduser(path)
    if tokenizer:
        return tokenizer
    if run_io.is_run_dir(real):
        return run_io.run_tokenizer(run_io.read_run_meta(real))
    return _tokenizer_in(real) if os.path.isdir(real) else None


def check_tokenizer(path: str, tokenizer: str | None) -> None:
    """Load the tokenizer ``cancerllm_jax.load(path, tokenizer=tokenizer)`` would use (no weights read), so a bad
    ``--tokenizer`` or a model without one fails before anything is written."""
    from cancerllm_jax.api import read_model_config, tokenizer_for

    if tokenizer_for(read_model_config(path), tokenizer_spec(path, tokenizer)) is None:
        raise UserError(f"{path}: no tokenizer found; pass --tokenizer")


def tokenizer_sha256(spec: str | None) -> str | None:
    """sha256 of the content of a tokenizer spec's files (as ``load_tokenizer`` reads it: ``None`` is the shipped
    Mistral v1 model, a folder its tokenizer and config files), so another tokenizer at the same path is seen;
    ``None`` when there is no such file."""
    from cancerllm_jax.data.tokenizer import mistral_v1_model_file

    if spec in (None, "", "mistral-v1", "mistral"):
        try:
            spec = mistral_v1_model_file()
        except UserError:
            return None
    spec = os.path.realpath(os.path.expanduser(spec))
    if os.path.isfile(spec) and os.path.basename(spec) in ("tokenizer.json", "tokenizer_config.json"):
        spec = os.path.dirname(spec)
    if os.path.isdir(spec):
        files = [n for n in sorted(os.listdir(spec)) if _TOKENIZER_FILES.match(n)
                 and os.path.isfile(os.path.join(spec, n))]
    else:
        files = [""] if os.path.isfile(spec) else []
    if not files:
        return None
    h = hashlib.sha256()
    for name in files:
        with open(os.path.join(spec, name) if name else spec, "rb") as f:
            h.update(f"{name}\0{hashlib.sha256(f.read()).hexdigest()}\0".encode())
    return h.hexdigest()


def provenance(fingerprint: dict[str, Any], spec: TaskSpec, cfg: RunConfig) -> dict[str, Any]:
    """Everything that decides the predictions of one (model, task): the model and every output-changing setting.
    Sampling settings that greedy decoding ignores are left out (the seed stays when it draws k-shot exemplars)."""
    d = cfg.decoding
    greedy = d.temperature <= 0
    # a base and an adapter only where there is one: records of models without them stay as earlier versions wrote
    extra = {k: fingerprint[k] for k in ("base", "adapter") if fingerprint.get(k)}
    return {"format": PROVENANCE_FORMAT, "task": spec.name, "model_path": fingerprint["path"],
            "checkpoint_step": fingerprint["checkpoint_step"], "weights": fingerprint["weights"], **extra,
            "prompt_format": f"alpaca, {d.shots}-shot" if d.shots else "alpaca, zero-shot",
            "max_input_tokens": spec.max_input_tokens, "max_new_tokens": spec.max_new_tokens, "stop": list(spec.stop),
            "temperature": 0.0 if greedy else d.temperature, "top_k": None if greedy else d.top_k,
            "top_p": None if greedy else d.top_p, "seed": d.seed if not greedy or d.shots else None,
            "dtype": cfg.dtype, "tokenizer": cfg.tokenizer, "tokenizer_sha256": fingerprint.get("tokenizer_sha256")}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key OLD (now NEW)"`` for every key whose value differs (``format`` aside)."""
    keys = [k for k in new if k != "format"] + [k for k in old if k not in new and k != "format"]
    return [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]


def read_json_file(path: str, what: str = "file", fix: str = "") -> Any:
    """A JSON file's content; bytes that are not UTF-8 or text that is not JSON raise ``UserError`` naming
    ``path:line`` (never quoting the content), then ``fix`` (what to do)."""
    with open(path, "rb") as f:
        data = f.read()
    fix = f"; {fix}" if fix else ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}): this {what} is damaged"
                        f"{fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): this {what} is damaged or cut short"
                        f"{fix}") from None


def _has_rows(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


_ADDED_KEYS = ("base", "tokenizer_sha256")  # recorded since 2026-12-02; records written before lack them


def check_provenance(out: str, model: str, task: str, want: dict[str, Any], overwrite: bool) -> bool:
    """Refuse to resume a prediction file that another model or other settings made (``UserError`` saying what
    differs); returns True when the file must be discarded first (``overwrite``, or nothing in it to keep)."""
    pred, meta = pred_path(out, model, task), provenance_path(out, model, task)
    if os.path.isfile(meta):
        try:
            have = read_json_file(meta, "record of what made the predictions",
                                  "delete it and its prediction file, or pass --overwrite")
            if not isinstance(have, dict):
                raise UserError(f"{meta}: expected a JSON object, got {json_type_name(have)}")
        except UserError:
            if overwrite or not _has_rows(pred):
                return True
            raise
        want = {k: v for k, v in want.items() if k in have or k not in _ADDED_KEYS}  # an older record: the rest
        if have == want or (have.get("format") == want.get("format") and not differences(have, want)):
            return False  # equal, a key absent on one side being null on the other
        problem = f"its predictions were made with other settings: {'; '.join(differences(have, want))}"
    else:
        problem = f"its predictions have no record of the model and settings that made them ({meta} is missing)"
    if not _has_rows(pred) or overwrite:
        return True
    raise UserError(f"{pred}: {problem}. Resuming would mix two models' or two decodings' predictions: use a fresh "
                    "--out, or pass --overwrite to discard this file and decode it again")


# ---------------------------------------------------------------- prediction files


def read_predictions(path: str, allow_torn_tail: bool = False) -> list[dict]:
    """The rows of a prediction file, checked: JSON objects with ``id, prompt_hash, gold, prediction``, no duplicate
    ids. With ``allow_torn_tail`` an unreadable LAST line without a newline (a write cut by an interrupt) is cut from
    the file; anywhere else it is an error. Errors name ``path:line`` and never quote the line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    rows, seen = [], {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines) and allow_torn_tail:  # the last line, with no newline after it
                os.truncate(path, len(data) - len(raw))
                print(f"warning: {path}:{number}: dropped an incomplete last line (interrupted write); "
                      "it will be decoded again", file=sys.stderr)
                break
            what = (f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})")
            raise UserError(f"{path}:{number}: {what}; fix or delete the line "
                            "(a deleted row is decoded again on the next run)") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {json_type_name(obj)}")
        missing = [k for k in PRED_FIELDS if k not in obj]
        if missing:
            raise UserError(f"{path}:{number}: missing field(s) {', '.join(missing)} "
                            f"(a prediction row is {{{', '.join(PRED_FIELDS)}}})")
        for k in PRED_FIELDS:
            if not isinstance(obj[k], str):
                raise UserError(f"{path}:{number}: field '{k}' must be a string, got {json_type_name(obj[k])}")
        if obj["id"] in seen:
            raise UserError(f"{path}:{number}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]}); delete "
                            "one of the two lines (were two runs writing to this --out at once?)")
        seen[obj["id"]] = number
        obj["_line"] = number
        rows.append(obj)
    return rows


def check_against_split(path: str, rows: list[dict], expected: dict[str, tuple[str, str]], complete: bool) -> None:
    """Every row's id must be in the test split with the same prompt hash and gold; with ``complete`` every test id
    must have a row."""
    for row in rows:
        where = f"{path}:{row['_line']}"
        if row["id"] not in expected:
            raise UserError(f"{where}: id {row['id']!r} is not in this run's test split ({len(expected)} instances); "
                            "was the file written for other data or another --limit? Use another --out, or run "
                            "`evaluate.py run` with the same flags plus --overwrite to drop such rows")
        want_hash, want_gold = expected[row["id"]]
        if want_hash is not None and row["prompt_hash"] != want_hash:
            raise UserError(f"{where}: id {row['id']!r} has prompt_hash {row['prompt_hash']} but the prompt built now "
                            f"hashes to {want_hash} (other data, template, tokenizer or --max-input-tokens); "
                            "use another --out, or run `evaluate.py run` with the same flags plus --overwrite to "
                            "decode such rows again")
        if want_gold is not None and row["gold"] != want_gold:
            raise UserError(f"{where}: id {row['id']!r}: its gold answer differs from the test split's")
    if complete:
        have = {r["id"] for r in rows}
        missing = [i for i in expected if i not in have]
        if missing:
            raise UserError(f"{path}: {len(rows)} predictions for {len(expected)} test instances; missing ids: "
                            f"{', '.join(map(repr, missing[:5]))}{' …' if len(missing) > 5 else ''}")


def refresh_rows(path: str, rows: list[dict], expected: dict[str, tuple[str, str]], overwrite: bool,
                 log: Callable[[str], None]) -> list[dict]:
    """Bring a prediction file in line with an edited test split, where that is sound: a row whose gold answer
    changed but whose prompt did not keeps its prediction with the new gold; with ``overwrite`` a row whose prompt
    changed, or whose id left the split, is dropped (decoded again). The file is rewritten atomically."""
    kept, regold, dropped = [], 0, 0
    for row in rows:
        want_hash, want_gold = expected.get(row["id"], (None, None))
        stale = row["id"] not in expected or (want_hash is not None and row["prompt_hash"] != want_hash)
        if stale and overwrite:
            dropped += 1
            continue
        if not stale and want_gold is not None and row["gold"] != want_gold:
            row = {**row, "gold": want_gold}
            regold += 1
        kept.append(row)
    if regold or dropped:
        _rewrite_rows(path, kept)
        said = ([f"{regold} gold answer(s) updated from the test split (same prompts: predictions kept)"] * bool(regold)
                + [f"--overwrite: {dropped} row(s) whose prompt changed or that left the split dropped, to be "
                   "decoded again"] * bool(dropped))
        log(f"{path}: {'; '.join(said)}")
        kept = [{**r, "_line": n} for n, r in enumerate(kept, 1)]
    return kept


def _rewrite_rows(path: str, rows: list[dict]) -> None:
    """Replace a prediction file by ``rows`` (read by :func:`read_predictions`), atomically."""
    from cancerllm_jax.train.run_io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps({k: v for k, v in r.items() if k != "_line"}, ensure_ascii=False)
                                    + "\n" for r in rows))


def _append_jsonl(path: str, rows: list[dict]) -> None:
    """Append ``rows`` on lines of their own (after a newline, if an interrupt cut the file just before one)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


_STATS_FIELDS = ("n", "time_s", "prompt_tokens", "generated_tokens")


def read_stats(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:  # a torn timing line only loses timing, never predictions
                    obj = None
                if isinstance(obj, dict) and all(type(obj.get(k)) in (int, float) for k in _STATS_FIELDS):
                    out.append(obj)
                else:
                    print(f"warning: {path}:{number}: unreadable timing line skipped", file=sys.stderr)
    return out


def summarize_stats(batches: list[dict]) -> dict[str, Any]:
    """Efficiency figures of one (model, task) from its per-batch lines."""
    t = sum(b["time_s"] for b in batches)
    gen = sum(b["generated_tokens"] for b in batches)
    steady = [b for b in batches if not b.get("compiled")]
    st, sg = sum(b["time_s"] for b in steady), sum(b["generated_tokens"] for b in steady)
    peaks = [b["peak_memory_bytes"] for b in batches if b.get("peak_memory_bytes")]
    return {
        "instances_decoded": sum(b["n"] for b in batches), "batches": len(batches), "sessions": len(
            {b.get("session") for b in batches}),
        "generation_time_s": round(t, 3), "prompt_tokens": sum(b["prompt_tokens"] for b in batches),
        "generated_tokens": gen, "tokens_per_s": round(gen / t, 2) if t > 0 else None,
        "compile_batches": len(batches) - len(steady),
        "steady_tokens_per_s": round(sg / st, 2) if st > 0 and sg else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "memory_kind": batches[-1].get("memory_kind") if batches else None,
        "context_tokens_cut": sum(b.get("context_tokens_cut", 0) for b in batches),
        "prompts_cut": sum(b.get("prompts_cut", 0) for b in batches),
        "prompts_with_fewer_shots": sum(b.get("fewer_shots", 0) for b in batches),
    }


# ---------------------------------------------------------------- environment


def peak_memory() -> tuple[int | None, str]:
    """``(bytes, kind)``: the first JAX device's ``peak_bytes_in_use`` on an accelerator (the process's high-water
    mark: JAX cannot reset it), else the host's peak RSS since the last ``reset_peak_memory`` (Linux ``VmHWM``; the
    process's ``ru_maxrss`` where that cannot be read)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            stats = dev.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return int(stats["peak_bytes_in_use"]), f"{dev.platform} peak_bytes_in_use ({dev.device_kind})"
        except Exception:  # noqa: BLE001 - some backends have no memory stats
            pass
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "host peak RSS (VmHWM)"
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host peak RSS (ru_maxrss)"


def reset_peak_memory() -> None:
    """Start the host's peak RSS afresh (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``), so a task or a
    noise rate reports its own peak, not an earlier one's; a no-op where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "transformers", "numpy", "rouge-score", "sacrebleu", "nltk", "cancerllm_jax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if sha:
            out["git_commit"] = sha
    except Exception:  # noqa: BLE001
        pass
    return out


def device_info() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs),
            "host_cpus": os.cpu_count(), "machine": platform.machine()}


# ---------------------------------------------------------------- decoding one (model, task)


def log_stderr(msg: str) -> None:
    """The runner's default progress log: one line to stderr."""
    print(msg, file=sys.stderr, flush=True)


def instance_seed(seed: int, instance_id: str) -> int:
    """The sampling seed of one test instance: its samples do not depend on batching or on a resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{instance_id}".encode()).digest()[:4], "little")


def training_exemplars(task: str, cfg: RunConfig) -> list[dict]:
    """The k-shot exemplars of ``task`` (its training split); too few for ``--shots`` is an error."""
    exemplars = read_train_split(task, cfg.data)
    if len(exemplars) < cfg.decoding.shots:
        raise UserError(f"--shots {cfg.decoding.shots}: the {task} training split has only {len(exemplars)} "
                        f"record(s) to draw exemplars from")
    return exemplars


def decode_task(lm, model: ModelEntry, spec: TaskSpec, records: list[dict], cfg: RunConfig,
                session: str, log: Callable[[str], None] = log_stderr) -> tuple[dict[str, Any], dict]:
    """Decode every record of one task not yet in the model's prediction file; returns the resume/decoding counts
    and ``{id: (prompt_hash, gold)}`` of the test split."""
    from cancerllm_jax.decode import generated_text

    path, spath = pred_path(cfg.out, model.name, spec.name), stats_path(cfg.out, model.name, spec.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if cfg.decoding.shots:
        exemplars = training_exemplars(spec.name, cfg)
        prompts = [build_few_shot_prompt(lm.tokenizer, r, spec, exemplars, cfg.decoding.shots, cfg.decoding.seed)
                   for r in records]
        fewer = sum(p.shots < cfg.decoding.shots for p in prompts)
        if fewer:
            log(f"[{model.name} / {spec.name}] {fewer} of {len(prompts)} prompts hold fewer than "
                f"{cfg.decoding.shots} exemplars: more did not fit {spec.max_input_tokens} prompt tokens")
    else:
        prompts = [build_prompt(lm.tokenizer, r, spec) for r in records]
    expected = {p.id: (p.hash, p.gold) for p in prompts}
    done_rows = refresh_rows(path, read_predictions(path, allow_torn_tail=True), expected, cfg.overwrite, log)
    check_against_split(path, done_rows, expected, complete=False)
    done = {r["id"] for r in done_rows}
    todo = [p for p in prompts if p.id not in done]
    if done:
        log(f"[{model.name} / {spec.name}] resuming: {len(done)} of {len(prompts)} already in {path}")
    # longest first: batches of similar length pad less and compile fewer prompt buckets
    todo.sort(key=lambda p: -len(p.ids))
    bs = cfg.decoding.batch_size
    reset_peak_memory()  # this task's own host peak (an accelerator's stays the process's)
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    for b, batch in enumerate(batches):
        n_fns = len(lm._decoder._fns) if lm._decoder is not None else 0
        t0 = time.perf_counter()
        outs = lm.generate([p.ids for p in batch], max_new_tokens=spec.max_new_tokens,
                           temperature=cfg.decoding.temperature, top_k=cfg.decoding.top_k,
                           top_p=cfg.decoding.top_p, seed=[instance_seed(cfg.decoding.seed, p.id) for p in batch],
                           batch_size=len(batch))
        elapsed = time.perf_counter() - t0
        compiled = len(lm._decoder._fns) > n_fns
        rows = []
        for p, gen in zip(batch, outs, strict=True):
            text = generated_text(lm.tokenizer, gen, lm.eos_ids, spec.stop)
            rows.append({"id": p.id, "prompt_hash": p.hash, "gold": p.gold, "prediction": text.strip()})
        _append_jsonl(path, rows)
        mem, kind = peak_memory()
        stats = lm._decoder.last_stats
        _append_jsonl(spath, [{"session": session, "batch": b, "n": len(batch), "time_s": round(elapsed, 4),
                               "prompt_tokens": stats.get("prompt_tokens", sum(len(p.ids) for p in batch)),
                               "generated_tokens": stats.get("generated_tokens", 0), "compiled": compiled,
                               "peak_memory_bytes": mem, "memory_kind": kind,
                               "context_tokens_cut": sum(p.context_tokens_cut for p in batch),
                               "prompts_cut": sum(p.context_tokens_cut > 0 for p in batch),
                               "fewer_shots": sum(p.shots < cfg.decoding.shots for p in batch)}])
        log(f"[{model.name} / {spec.name}] batch {b + 1}/{len(batches)}: {len(batch)} in {elapsed:.1f}s"
            f"{' (compiled)' if compiled else ''}, {stats.get('generated_tokens', 0)} tokens")
    _in_split_order(path, list(expected))
    return {"resumed": len(done), "decoded": len(todo)}, expected


def _in_split_order(path: str, ids: list[str]) -> None:
    """Rewrite a complete prediction file in the test split's order (it is written longest prompt first), so that
    its lines pair with the test file's; a file already in order is left alone."""
    rows = read_predictions(path)
    position = {i: n for n, i in enumerate(ids)}
    ordered = sorted(rows, key=lambda r: position.get(r["id"], len(ids)))
    if [r["id"] for r in ordered] != [r["id"] for r in rows]:
        _rewrite_rows(path, ordered)


# ---------------------------------------------------------------- scoring


def score_predictions(path: str, protocol: str, expected: dict[str, tuple[str, str]] | None = None,
                      order: Sequence[str] | None = None, task: str | None = None) -> dict[str, Any]:
    """Score one prediction file (re-scoring needs no model). With ``expected`` (id → (hash, gold)) the file must
    cover exactly the test split. Instances are taken in ``order`` (the split's ids) where given, so per-instance
    values line up with it; a radiation-oncology ``task`` also gets its ``radonc`` metrics."""
    if not os.path.exists(path):
        raise UserError(f"{path}: prediction file not found")
    rows = read_predictions(path)
    if not rows:
        raise UserError(f"{path}: no predictions")
    if expected is not None:
        check_against_split(path, rows, expected, complete=True)
    by_id = {r["id"]: r for r in rows}
    ids = [i for i in (order or by_id) if i in by_id]
    result = score([by_id[i]["gold"] for i in ids], [by_id[i]["prediction"] for i in ids], protocol)
    result["empty_predictions"] = sum(1 for i in ids if not by_id[i]["prediction"].strip())
    if task is not None and get_task(task).kind == "radonc":
        extra = _radonc_metrics(task, [by_id[i]["gold"] for i in ids], [by_id[i]["prediction"] for i in ids])
        if extra:
            result["radonc"] = extra
    return result


def _radonc_metrics(task: str, golds: list[str], preds: list[str]) -> dict[str, Any] | None:
    """Task-specific radiation-oncology metrics from ``eval/radonc.py`` when that module is available."""
    try:
        from cancerllm_jax.eval import radonc
    except ImportError:
        return None
    fn = {"radonc_modality": "modality_metrics", "radonc_icd10": "icd10_metrics",
          "radonc_regimen": "regimen_rouge1"}.get(task)
    f = getattr(radonc, fn, None) if fn else None
    if f is None:
        return None
    try:
        out = f(golds, preds)
    except Exception as e:  # noqa: BLE001 - never lose the main scores over an optional extra
        return {"error": f"{type(e).__name__}: {e}"}
    return out if isinstance(out, dict) else None


def score_all(metrics: dict[str, Any], out: str, protocol: str, split: dict[str, dict] | None = None,
              pairs: Sequence[tuple[str, str]] | None = None) -> None:
    """Fill ``metrics['results'][task][model]`` from the prediction files, for the (task, model) ``pairs`` (default:
    every task with every model)."""
    results = metrics.setdefault("results", {})
    if pairs is None:
        pairs = [(task, model) for task in metrics["tasks"] for model in metrics["models"]]
    for task, model in pairs:
        path = pred_path(out, model, task)
        expected = (split.get(task) or {}).get(model) if split else None
        order = list(expected) if expected else None
        res = score_predictions(path, protocol, expected, order, task)
        res["efficiency"] = summarize_stats(read_stats(stats_path(out, model, task)))
        res["predictions"] = os.path.relpath(path, out)
        meta = provenance_path(out, model, task)
        if os.path.isfile(meta):  # what made the file's predictions (model, weights, decoding settings)
            res["produced_by"] = read_json_file(meta, "record of what made the predictions",
                                                "delete it to re-score without it")
        prev = results.get(task, {}).get(model, {})
        res.update({k: v for k, v in prev.items() if k in ("load_time_s", "resumed", "decoded")})
        results.setdefault(task, {})[model] = res


# ---------------------------------------------------------------- the whole run


def _write_json(path: str, obj: Any) -> None:
    from cancerllm_jax.train.run_io import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_results(out: str, metrics: dict[str, Any]) -> None:
    """``OUT/metrics.json``, then ``report.md`` and its plots; an older report is removed first, so a report never
    describes other metrics than those beside it, even when writing it fails."""
    from cancerllm_jax.eval.report import write_report

    if os.path.isfile(os.path.join(out, "report.md")):
        os.remove(os.path.join(out, "report.md"))
    _write_json(os.path.join(out, "metrics.json"), metrics)
    write_report(out, metrics)


def run(cfg: RunConfig, log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Decode (resuming), score, write ``metrics.json`` and ``report.md``; returns the metrics. One run at a time
    holds ``cfg.out`` (a second is refused)."""
    from cancerllm_jax.train.run_io import FolderLock

    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {cfg.protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if cfg.decoding.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.decoding.batch_size}")
    if not cfg.models:
        raise UserError("give at least one --model")
    from cancerllm_jax.model import resolve_dtype
    from cancerllm_jax.sharding import parse_mesh

    resolve_dtype(cfg.dtype)  # before OUT holds a provenance record naming it
    parse_mesh(cfg.mesh)
    if len(cfg.tasks) > 1 and parse_synthetic(cfg.data) is None and os.path.isfile(cfg.data):
        raise UserError(f"--data {cfg.data} is one file, but {len(cfg.tasks)} tasks were given "
                        f"({', '.join(s.name for s in cfg.tasks)}): one file is one task's test split; give one "
                        "task, or a folder with <task>/test.jsonl for each")
    # everything that can be checked without a model is checked before OUT is created
    records = {spec.name: read_test_split(spec.name, cfg.data, cfg.limit) for spec in cfg.tasks}
    if cfg.decoding.shots:
        for spec in cfg.tasks:
            training_exemplars(spec.name, cfg)
    fingerprints = {}
    for m in cfg.models:
        if not os.path.exists(os.path.expanduser(m.path)):
            raise UserError(f"model path not found: {os.path.abspath(os.path.expanduser(m.path))}")
        fingerprints[m.name] = model_fingerprint(m.path)
        check_tokenizer(m.path, cfg.tokenizer)
        fingerprints[m.name]["tokenizer_sha256"] = tokenizer_sha256(tokenizer_spec(m.path, cfg.tokenizer))
        if m.adapter is not None:  # checked against its base's config now, not after other models have decoded
            from cancerllm_jax.api import check_adapter

            fingerprints[m.name]["adapter"] = adapter_fingerprint(check_adapter(m.adapter, m.path))
    wanted = {(m.name, s.name): provenance(fingerprints[m.name], s, cfg) for m in cfg.models for s in cfg.tasks}
    os.makedirs(cfg.out, exist_ok=True)
    with FolderLock(cfg.out, "--out"):  # two runs on one --out would append the same rows twice
        return _run_locked(cfg, log, records, fingerprints, wanted)


def _run_locked(cfg: RunConfig, log: Callable[[str], None], records: dict[str, list[dict]],
                fingerprints: dict[str, dict], wanted: dict[tuple[str, str], dict]) -> dict[str, Any]:
    """``run`` once ``cfg.out`` is this process's: discard what ``--overwrite`` replaces, decode, score, write."""
    import cancerllm_jax as cj

    fresh = [key for key, want in wanted.items() if check_provenance(cfg.out, *key, want, cfg.overwrite)]
    this_run = [(s.name, m.name) for s in cfg.tasks for m in cfg.models]
    tasks = {s.name: task_entry(s, records[s.name]) for s in cfg.tasks}
    earlier, kept = _earlier_results(cfg, fingerprints, tasks, this_run, log)
    os.makedirs(os.path.join(cfg.out, "predictions"), exist_ok=True)
    discarded = [key for key in fresh if _has_rows(pred_path(cfg.out, *key))]
    if discarded:  # the old report describes the predictions discarded now; metrics.json keeps the kept results
        if os.path.isfile(os.path.join(cfg.out, "report.md")):
            os.remove(os.path.join(cfg.out, "report.md"))
        if kept:  # for a later run to keep them should this one be cut short
            _write_json(os.path.join(cfg.out, "metrics.json"), {**earlier, "results": {
                t: {m: r for m, r in by_model.items() if (t, m) in kept} for t, by_model in earlier["results"].items()
                if any((t, m) in kept for m in by_model)}})
        elif os.path.isfile(os.path.join(cfg.out, "metrics.json")):
            os.remove(os.path.join(cfg.out, "metrics.json"))
    for key in fresh:
        for path in (pred_path(cfg.out, *key), stats_path(cfg.out, *key)):
            if os.path.isfile(path):
                os.remove(path)
        if key in discarded:
            log(f"[{key[0]} / {key[1]}] --overwrite: discarded predictions made with other settings")
        _write_json(provenance_path(cfg.out, *key), wanted[key])
    session = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    metrics: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "protocol": cfg.protocol, "data": describe_data(cfg.data), "limit": cfg.limit,
        "decoding": cfg.decoding.to_dict(), "dtype": cfg.dtype, "mesh": cfg.mesh,
        "seeds": {"decoding": cfg.decoding.seed, "synthetic_data": cfg.data if cfg.data.startswith("synthetic")
                  else None},
        "models": {m.name: dict(fingerprints[m.name]) for m in cfg.models},
        "tasks": tasks,
        "versions": versions(), "device": device_info(), "command": " ".join(sys.argv),
    }
    split: dict[str, dict] = {s.name: {} for s in cfg.tasks}
    runs: dict[tuple[str, str], dict] = {}
    for model in cfg.models:
        t0 = time.perf_counter()
        lm = cj.load(model.path, dtype=cfg.dtype, mesh=cfg.mesh, tokenizer=cfg.tokenizer, adapter=model.adapter)
        load_s = time.perf_counter() - t0
        if lm.tokenizer is None:
            raise UserError(f"{model.path}: no tokenizer found; pass --tokenizer")
        metrics["models"][model.name].update({"load_time_s": round(load_s, 2), "model_type": lm.cfg.model_type,
                                              "params_m": _param_count(lm) / 1e6,
                                              "tokenizer": getattr(lm.tokenizer, "name", type(lm.tokenizer).__name__)})
        log(f"[{model.name}] loaded {model.path}{f' + adapter {model.adapter}' if model.adapter else ''} "
            f"in {load_s:.1f}s")
        for spec in cfg.tasks:
            counts, split[spec.name][model.name] = decode_task(lm, model, spec, records[spec.name], cfg, session, log)
            runs[(spec.name, model.name)] = counts
        del lm
    for task, model in kept:  # an earlier run's results in this folder, scored again from their files
        metrics["tasks"].setdefault(task, earlier["tasks"][task])
        metrics["models"].setdefault(model, earlier["models"][model])
        ids = earlier["tasks"][task].get("ids")
        split.setdefault(task, {})[model] = {str(i): (None, None) for i in ids} if ids else None
        metrics.setdefault("results", {}).setdefault(task, {})[model] = earlier["results"][task][model]
    if kept:
        metrics["notes"] = [f"kept from an earlier `evaluate.py run` into this folder ({earlier.get('created', '?')}) "
                            "and scored again from their prediction files (each one's settings are in its "
                            "`produced_by` record): " + ", ".join(f"{t} / {m}" for t, m in kept)]
    score_all(metrics, cfg.out, cfg.protocol, split, [*this_run, *kept])
    for (task, model), counts in runs.items():
        metrics["results"][task][model].update(counts)
    write_results(cfg.out, metrics)
    return metrics


_LOAD_KEYS = ("load_time_s", "model_type", "params_m", "tokenizer")  # what a run adds to a model's fingerprint


def task_entry(spec: TaskSpec, records: list[dict]) -> dict[str, Any]:
    """A task's entry in ``metrics.json``: its settings, the test ids and a digest of the test records (what a later
    run compares before it keeps this run's results)."""
    digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**spec.to_dict(), "n": len(records), "ids": [str(r["id"]) for r in records], "records_sha256": digest}


_RUN_KEYS = ("data", "limit", "decoding", "dtype")  # the run-wide settings a report states once for every result


def _earlier_results(cfg: RunConfig, fingerprints: dict[str, dict], tasks: dict[str, dict],
                     this_run: list[tuple[str, str]], log: Callable[[str], None]) -> tuple[dict, list[tuple[str, str]]]:
    """The (task, model) results that an earlier run into ``cfg.out`` scored and this one does not redo, so that
    runs of one task (or model) at a time build one ``metrics.json`` and report. They are kept only when that run
    had this one's data, --limit, decoding settings and dtype (the report states them once for all), and each
    result when its prediction file is still there, its test records are unchanged (digest), its model name here
    means the same weights and tokenizer, and a task run again here has the same settings; any other is left out,
    said in the log. Returns (the earlier metrics, the kept pairs)."""
    path = os.path.join(cfg.out, "metrics.json")
    if not os.path.isfile(path):
        return {}, []
    try:
        old = read_json_file(path, "metrics file", "it is replaced")
    except UserError as e:
        log(f"{e}; its results are not kept")
        return {}, []
    if not (isinstance(old, dict) and all(isinstance(old.get(k), dict) for k in ("models", "tasks", "results"))):
        log(f"{path}: not a metrics.json written by `evaluate.py run`; replaced, its results are not kept")
        return {}, []
    now = _as_json({"data": describe_data(cfg.data), "limit": cfg.limit, "decoding": cfg.decoding.to_dict(),
                    "dtype": cfg.dtype})
    other = [k for k in _RUN_KEYS if old.get(k) != now[k]]
    candidates = [(t, m) for t, by_model in old["results"].items() if isinstance(by_model, dict) for m in by_model
                  if (t, m) not in this_run]
    if other and candidates:
        log(f"{path}: the earlier run's results ({', '.join(f'{t} / {m}' for t, m in candidates)}) are not kept: it "
            f"had other {', '.join(k.replace('limit', '--limit') for k in other)}")
    if other:
        return old, []
    entries = _as_json(tasks)
    kept, left = [], []
    for task, model in candidates:
        spec, was = old["tasks"].get(task), old["models"].get(model)
        if task not in entries:  # a task this run does not read: its test records as they are now
            try:
                entries[task] = _as_json(task_entry(get_task(task), read_test_split(task, cfg.data, cfg.limit)))
            except (UserError, KeyError):
                entries[task] = None
        same_model = isinstance(was, dict) and (model not in fingerprints or _as_json(fingerprints[model]) == {
            k: v for k, v in was.items() if k not in _LOAD_KEYS})
        same_task = isinstance(spec, dict) and entries[task] is not None and (
            spec == entries[task] if task in tasks else spec.get("records_sha256") == entries[task]["records_sha256"])
        if same_model and same_task and os.path.isfile(pred_path(cfg.out, model, task)):
            kept.append((task, model))
        else:
            left.append(f"{task} / {model}")
    if left:
        log(f"{path}: earlier results not kept in the new one (their prediction file is gone, their test records "
            f"changed, or this run's model of that name or task settings differ): {', '.join(left)}")
    return old, kept


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from a JSON file (tuples become lists), to compare it with what a file holds."""
    return json.loads(json.dumps(obj))


def _param_count(lm) -> float:
    import jax

    return float(sum(x.size for x in jax.tree.leaves(lm.state) if hasattr(x, "size")))


_REBUILD = ("run `evaluate.py run` again with the same --out, models and settings to rebuild it (finished "
            "predictions are not decoded again)")


def rescore(out: str, protocol: str | None = None, write: bool = True) -> dict[str, Any]:
    """Re-score a finished run from its prediction files (no model, no decoding); rewrite metrics and report."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: rescore needs a finished `evaluate.py run` folder")
    metrics = read_json_file(path, "metrics file", _REBUILD)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("models"), dict) \
            or not isinstance(metrics.get("tasks"), dict):
        raise UserError(f"{path}: not a metrics.json written by `evaluate.py run` (no 'models' and 'tasks' "
                        f"objects); {_REBUILD}")
    protocol = protocol or metrics.get("protocol", "standard")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    old = metrics.get("results", {})
    counts = {task: {m: r.get("n") for m, r in by_model.items()} for task, by_model in old.items()}
    # each file must cover exactly the run's test ids (gold and prompt hash are taken from the file)
    pairs = [(task, m) for task, by_model in old.items() for m in by_model] if old else None
    split = {task: {m: {i: (None, None) for i in spec["ids"]} for m in metrics["models"]
                    if pairs is None or (task, m) in pairs}
             for task, spec in metrics["tasks"].items() if spec.get("ids")}
    metrics["protocol"] = protocol
    score_all(metrics, out, protocol, split or None, pairs)
    for task, by_model in metrics["results"].items():
        for model, res in by_model.items():
            n = counts.get(task, {}).get(model)
            if n is not None and res["n"] != n:
                raise UserError(f"{pred_path(out, model, task)}: {res['n']} predictions but the run scored {n}; "
                                "the file was changed since the run")
    metrics["rescored"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if write:
        write_results(out, metrics)
    return metrics
