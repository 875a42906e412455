"""The evaluation tasks: what each one asks, its decoding limits, how its prompts are built and where its test split
comes from.

The three CancerLLM tasks use the paper's limits (Table 7): phenotypes 1500 prompt tokens / 50 new tokens, diagnosis
1500 / 500, treatment plan 4000 / 500. The radiation-oncology tasks (answers of a few words) use short limits.

A test split comes from ``data``:

- ``"synthetic"`` or ``"synthetic:PATIENTS[:SEED]"``: the built-in synthetic data (60 patients, seed 0 by default,
  the same patients ``launch/finetune.py --task T`` trains on, so the test patients are unseen in training);
- a folder: ``DIR/<task>/test.jsonl`` (the layout ``tools/make_synthetic_data.py`` writes) or ``DIR/<task>.jsonl``;
- a ``.jsonl`` file: used for every requested task (so give one task).

Records are ``{id?, instruction?, context?, response}`` with an instruction or a context (or both); a missing,
empty or blank ``instruction`` takes the task's default; a missing ``id`` becomes ``line<N>``. Nothing here imports jax.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from cancerllm_jax.errors import UserError

DEFAULT_SYNTHETIC_PATIENTS = 60  # FinetuneConfig.synthetic_patients
DEFAULT_SYNTHETIC_SEED = 0


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task."""

    name: str
    title: str
    max_input_tokens: int  # prompt budget incl. BOS; the CONTEXT is cut at its end to fit
    max_new_tokens: int
    paper_table: str  # where the paper reports it
    kind: str = "generation"  # "generation" (EM/BLEU-2/ROUGE-L) or "radonc" (also eval/radonc.py metrics)
    stop: tuple[str, ...] = ()  # the protocol decodes to EOS or the limit; no stop strings by default

    def with_limits(self, max_input_tokens: int | None = None, max_new_tokens: int | None = None) -> TaskSpec:
        """A copy with other limits (``None`` keeps a limit)."""
        return replace(self, max_input_tokens=max_input_tokens or self.max_input_tokens,
                       max_new_tokens=max_new_tokens or self.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


TASKS: dict[str, TaskSpec] = {
    "phenotype": TaskSpec("phenotype", "Cancer phenotype extraction", 1500, 50, "Table 2"),
    "diagnosis": TaskSpec("diagnosis", "Cancer diagnosis generation", 1500, 500, "Table 3"),
    "treatment_plan": TaskSpec("treatment_plan", "Cancer treatment plan generation", 4000, 500, "Table 4"),
    "radonc_regimen": TaskSpec("radonc_regimen", "Radiation treatment regimen", 1024, 64, "RadOnc (ROUGE-1)",
                               kind="radonc"),
    "radonc_modality": TaskSpec("radonc_modality", "Radiation treatment modality", 1024, 8, "RadOnc (accuracy)",
                                kind="radonc"),
    "radonc_icd10": TaskSpec("radonc_icd10", "ICD-10 code prediction", 1024, 16, "RadOnc (accuracy)",
                             kind="radonc"),
}
CANCERLLM_TASKS = ("phenotype", "diagnosis", "treatment_plan")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(text: str | list[str]) -> list[TaskSpec]:
    """``"phenotype,diagnosis"`` (or a list; ``all`` = the three CancerLLM tasks) → specs, duplicates dropped."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(CANCERLLM_TASKS)
    if not names:
        raise UserError("no tasks given; e.g. --tasks phenotype,diagnosis,treatment_plan")
    return [get_task(n) for n in dict.fromkeys(names)]


# ---------------------------------------------------------------- prompts


def prompt_hash(text: str) -> str:
    """First 16 hex digits of the prompt text's sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Prompt:
    """A generation prompt: the ids fed to the model (``[bos] + prompt`` where the tokenizer adds a BOS), the text
    they spell and its hash."""

    id: str
    ids: list[int]
    text: str
    hash: str
    context_tokens_cut: int
    gold: str
    shots: int = 0  # training exemplars in the prompt (fewer than asked when they did not fit)


def build_prompt(tokenizer, record: dict, spec: TaskSpec) -> Prompt:
    """The Alpaca generation prompt of one record within ``spec.max_input_tokens`` (cutting the context's end)."""
    from cancerllm_jax.data.instruct import generation_prompt

    ids, text, cut = generation_prompt(tokenizer, record["instruction"], record.get("context") or "",
                                       spec.max_input_tokens, example_id=f"{spec.name} record {record['id']}")
    return Prompt(str(record["id"]), ids, text, prompt_hash(text), cut, record["response"])


def build_few_shot_prompt(tokenizer, record: dict, spec: TaskSpec, exemplars: list[dict], k: int,
                          seed: int = 0) -> Prompt:
    """A k-shot prompt (BenchHealth): ``k`` training exemplars then the Alpaca generation prompt. When it does
    not fit ``spec.max_input_tokens``, fewer exemplars are used; with none left it is ``build_prompt``."""
    from cancerllm_jax.eval.trust import few_shot_prompt

    for shots in range(k, 0, -1):
        try:
            text = few_shot_prompt(record, exemplars, shots, seed)
        except ValueError as e:  # fewer exemplars than shots once the record itself is left out
            raise UserError(f"{record['id']}: {e}") from None
        ids = tokenizer.encode(text, bos=True)
        if len(ids) <= spec.max_input_tokens:
            return Prompt(str(record["id"]), ids, text, prompt_hash(text), 0, record["response"], shots)
    return build_prompt(tokenizer, record, spec)


# ---------------------------------------------------------------- test splits


def parse_synthetic(data: str) -> tuple[int, int] | None:
    if data != "synthetic" and not data.startswith("synthetic:"):
        return None
    parts = data.split(":")[1:]
    try:
        patients = int(parts[0]) if parts and parts[0] else DEFAULT_SYNTHETIC_PATIENTS
        seed = int(parts[1]) if len(parts) > 1 else DEFAULT_SYNTHETIC_SEED
    except ValueError:
        raise UserError(f"--data {data!r}: expected synthetic, synthetic:PATIENTS or synthetic:PATIENTS:SEED") from None
    if len(parts) > 2 or patients < 10:
        raise UserError(f"--data {data!r}: expected synthetic[:PATIENTS[:SEED]] with PATIENTS >= 10")
    return patients, seed


_SYNTHETIC_CACHE: dict[tuple[int, int], dict] = {}


def test_split_path(task: str, data: str) -> str:
    """The JSONL file holding ``task``'s test split under ``data`` (a folder or a file)."""
    if os.path.isfile(data):
        return data
    if os.path.isdir(data):
        for candidate in (os.path.join(data, task, "test.jsonl"), os.path.join(data, f"{task}.jsonl")):
            if os.path.isfile(candidate):
                return candidate
        raise UserError(f"--data {data}: no {task}/test.jsonl or {task}.jsonl in this folder")
    raise UserError(f"--data {data}: not a file, a folder or 'synthetic[:PATIENTS[:SEED]]'")


def line_id(number: int, unnamed: str = "line") -> str:
    """The id of a JSONL record without one: ``line<N>`` (N its 1-based line), as every reader and writer names it."""
    return f"{unnamed}{number}"


def read_jsonl_records(path: str, task: str, unnamed: str = "line") -> list[dict]:
    """``{id, instruction, context, response}`` records of a user JSONL (a line without an id is ``<unnamed><N>``);
    clear errors name the file and line."""
    from cancerllm_jax.data.instruct import unread_fields_problem
    from cancerllm_jax.data.sources import read_jsonl

    default_instruction = _default_instruction(task)
    rows, _ = read_jsonl(path, {"response": str}, optional={"instruction": str, "context": str, "id": (str, int)},
                         line_key="_line", skip_flag=None)
    records, seen = [], {}
    for obj in rows:
        number = obj.pop("_line")
        problem = unread_fields_problem(obj, test=True)  # Alpaca's input, generate.py's prompt: text not read
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        instruction = (obj.get("instruction") or "").strip()  # empty or blank: the task's default
        if not instruction and not obj.get("context"):  # the task's default instruction alone
            others = sorted(k for k in obj if k not in ("id", "response", "instruction", "context"))
            raise UserError(f"{path}:{number}: neither 'instruction' nor 'context' (the fields read are "
                            f"instruction, context, response{'; this line has ' + ', '.join(others) if others else ''}"
                            ")")
        if isinstance(obj.get("id"), bool):
            raise UserError(f"{path}:{number}: 'id' must be a string or an integer")
        rid = str(obj.get("id", line_id(number, unnamed)))
        if rid in seen:
            raise UserError(f"{path}:{number}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = number
        records.append({"id": rid, "instruction": obj["instruction"] if instruction else default_instruction,
                        "context": obj.get("context") or "", "response": obj["response"],
                        **{k: v for k, v in obj.items() if k not in ("id", "instruction", "context", "response")}})
    return records


def _default_instruction(task: str) -> str:
    from cancerllm_jax.data.synthetic import INSTRUCTIONS

    return INSTRUCTIONS.get(task, "")


def read_test_split(task: str, data: str = "synthetic", limit: int | None = None) -> list[dict]:
    """The test records of ``task`` from ``data`` (see the module doc), the first ``limit`` of them if given."""
    get_task(task)
    synthetic = parse_synthetic(data)
    if synthetic is not None:
        records = [dict(r) for r in _synthetic(synthetic)[task]["test"]]
    else:
        records = read_jsonl_records(test_split_path(task, data), task)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    return records


def _synthetic(key: tuple[int, int]) -> dict:
    """The synthetic datasets of ``(patients, seed)``, generated once per process."""
    if key not in _SYNTHETIC_CACHE:
        from cancerllm_jax.data.synthetic import instruction_datasets

        _SYNTHETIC_CACHE[key] = instruction_datasets(*key)
    return _SYNTHETIC_CACHE[key]


def read_train_split(task: str, data: str = "synthetic") -> list[dict]:
    """The training records of ``task`` (k-shot exemplars): synthetic, or ``DIR/<task>/train.jsonl``."""
    synthetic = parse_synthetic(data)
    if synthetic is not None:
        return [dict(r) for r in _synthetic(synthetic)[task]["train"]]
    path = os.path.join(data, task, "train.jsonl") if os.path.isdir(data) else ""
    if not os.path.isfile(path):
        raise UserError(f"--shots needs training exemplars: no {task}/train.jsonl under --data {data}")
    return read_jsonl_records(path, task, unnamed="train-line")  # never the id of a test record without one


def describe_data(data: str) -> str:
    synthetic = parse_synthetic(data)
    if synthetic is not None:
        return f"synthetic ({synthetic[0]} patients, seed {synthetic[1]}, test split)"
    return os.path.abspath(data)
