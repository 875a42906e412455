"""Instruction-tuning data: the authors' Alpaca template, response-only loss, context truncation, Grain batches.

One example becomes ``[bos] prompt response [eos]`` (``[bos]`` where the tokenizer starts text with one, as
``tokenizer(text)`` does: Mistral, Llama; not GPT-2-style tokenizers); the loss covers the response and the EOS.
Response tokens are the continuation of the prompt's own tokenisation (``encode(prompt + response)`` minus the
prompt's tokens, checked to be an exact prefix; otherwise the response is encoded on its own), so the mask starts
exactly at the response and the trained tokens are the ones the model emits after the generation prompt.

Rows are padded to ``max_seq_len`` (one static shape: one compilation); ``pack=True`` instead packs several
examples per row as separate segments (positions restart per example, attention stays within an example), which
gives the same mean loss over the same examples with far fewer padded tokens. ``max_seq_len`` bounds the whole
example ``[bos] … [eos]`` as HF's ``max_seq_length`` does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np

from cancerllm_jax.data.pretrain import (FIELDS, Batch, check_process_split, fixed_batches, pad_rows, strip_special,
                                         take_rows)
from cancerllm_jax.data.sources import content_digest, json_type_name, read_jsonl, renamed_field_hint
from cancerllm_jax.data.tokenizer import bos_ids, training_eos_id
from cancerllm_jax.errors import UserError

log = logging.getLogger(__name__)

PROMPT_WITH_CONTEXT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context.\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
PROMPT_NO_CONTEXT = ("Below is an instruction that describes a task.\n\n"
                     "### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_NO_CONTEXT_GENERATION = ("Below is an instruction that describes a task. Write a response that appropriately "
                                "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def _render(instruction: str, context: str | None, with_context: bool, for_generation: bool) -> str:
    if with_context:
        return PROMPT_WITH_CONTEXT.format(instruction=instruction, context=context or "")
    template = PROMPT_NO_CONTEXT_GENERATION if for_generation else PROMPT_NO_CONTEXT
    return template.format(instruction=instruction)


def render_prompt(instruction: str, context: str | None = None, for_generation: bool = False) -> str:
    """The Alpaca prompt up to and including ``"### Response:\\n"``; an empty/missing context uses the no-context
    variant, which at generation time adds " Write a response that appropriately completes the request."."""
    return _render(instruction, context, bool(context), for_generation)


def render_example(instruction: str, context: str | None, response: str) -> str:
    """The full training text (prompt + response), as in the authors' template."""
    return render_prompt(instruction, context) + response


def _response_ids(tokenizer, prompt: str, prompt_ids: list[int], response: str) -> list[int]:
    joint = strip_special(tokenizer.encode(prompt + response), tokenizer)
    if joint[:len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    return strip_special(tokenizer.encode(response), tokenizer)


def generation_prompt(tokenizer, instruction: str, context: str | None, max_tokens: int,
                      example_id: str = "example") -> tuple[list[int], str, int]:
    """``(ids, text, context tokens cut)`` of the Alpaca generation prompt within ``max_tokens``: ``text`` is what the
    model sees (the rendered prompt, or the decoded ids when the context was cut), the text a prompt hash is of."""
    ids, cut = encode_prompt(tokenizer, instruction, context, max_tokens, for_generation=True, example_id=example_id)
    text = tokenizer.decode(strip_special(ids, tokenizer)) if cut else render_prompt(instruction, context, True)
    return ids, text, cut


def encode_prompt(tokenizer, instruction: str, context: str | None, max_tokens: int, for_generation: bool = False,
                  example_id: str = "example") -> tuple[list[int], int]:
    """``[bos] + prompt`` ids within ``max_tokens``, cutting the END of the context if needed; and the number of
    context tokens cut. Raises ``UserError`` if the prompt cannot fit even with an empty context."""
    has_context = bool(context)

    def ids_for(ctx: str | None) -> list[int]:
        text = _render(instruction, ctx, has_context, for_generation)
        return bos_ids(tokenizer) + strip_special(tokenizer.encode(text), tokenizer)

    ids = ids_for(context)
    if len(ids) <= max_tokens:
        return ids, 0
    empty = ids_for("")
    if not has_context or len(empty) > max_tokens:
        limit, fix = ("the prompt-token limit", "raise it (generate.py --max-prompt-tokens, evaluate.py "
                      "--max-input-tokens) or shorten the instruction") if for_generation else (
            "max_seq_len minus the response and EOS", "raise max_seq_len or shorten the instruction/response")
        raise UserError(f"{example_id}: the prompt needs {len(empty)} tokens without any context, but only "
                        f"{max_tokens} fit ({limit}); {fix}")
    ctx_ids = strip_special(tokenizer.encode(context), tokenizer)
    keep = len(ctx_ids) - (len(ids) - max_tokens)
    while keep > 0:
        kept = tokenizer.decode(ctx_ids[:keep])
        while kept.endswith("\ufffd") and not context.startswith(kept):  # a byte-level cut inside a character
            kept = kept[:-1]
        ids = ids_for(kept)
        if len(ids) <= max_tokens:
            return ids, len(ctx_ids) - keep
        keep -= max(1, len(ids) - max_tokens)
    return empty, len(ctx_ids)


@dataclass
class EncodedExample:
    """``tokens = [bos] prompt response [eos]``; ``prompt_len`` counts ``[bos] prompt``."""

    tokens: list[int]
    prompt_len: int
    context_tokens_cut: int = 0

    def row(self, max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        return pack_row([self], max_seq_len, pad_id)


def encode_example(tokenizer, instruction: str, context: str | None, response: str, max_seq_len: int,
                   example_id: str = "example") -> EncodedExample:
    """Tokenise one example with loss on the response and EOS only; truncate the context (never the instruction,
    the template or the response) so that the whole sequence has at most ``max_seq_len`` tokens."""
    prompt = render_prompt(instruction, context)
    prompt_ids = strip_special(tokenizer.encode(prompt), tokenizer)
    resp = _response_ids(tokenizer, prompt, prompt_ids, response)
    budget = max_seq_len - len(resp) - 1
    if budget < 1:
        raise UserError(f"{example_id}: the response alone is {len(resp)} tokens (+EOS), which leaves no room for "
                        f"the prompt in max_seq_len {max_seq_len}; raise max_seq_len")
    ids, cut = encode_prompt(tokenizer, instruction, context, budget, example_id=example_id)
    return EncodedExample(ids + resp + [training_eos_id(tokenizer)], len(ids), cut)


def pack_row(examples: Sequence[EncodedExample], max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row holding ``examples`` as segments 1, 2, …: ``inputs = tokens[:-1]``, ``targets = tokens[1:]``."""
    row = {k: np.zeros(max_seq_len, np.int32) for k in FIELDS}
    row["inputs"][:] = pad_id
    row["targets"][:] = pad_id
    at = 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex.tokens) - 1
        if at + n > max_seq_len:
            raise ValueError(f"examples need {at + n} positions, more than {max_seq_len}")
        toks = np.asarray(ex.tokens, np.int32)
        row["inputs"][at:at + n] = toks[:-1]
        row["targets"][at:at + n] = toks[1:]
        row["loss_mask"][at + ex.prompt_len - 1:at + n] = 1  # targets from the first response token to EOS
        row["segment_ids"][at:at + n] = seg
        row["positions"][at:at + n] = np.arange(n, dtype=np.int32)
        at += n
    return row


def pack_groups(examples: Sequence[EncodedExample], max_seq_len: int, pack: bool) -> list[list[int]]:
    """Example indices per row: one each, or greedily packed in order (a new row when the next does not fit)."""
    if not pack:
        return [[i] for i in range(len(examples))]
    groups: list[list[int]] = []
    used = max_seq_len + 1
    for i, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        if used + n > max_seq_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


class InstructRows:
    """Random-access rows (a Grain data source) built on demand from encoded examples and their grouping."""

    def __init__(self, examples: Sequence[EncodedExample], groups: Sequence[Sequence[int]], max_seq_len: int,
                 pad_id: int):
        self.examples, self.groups = list(examples), [list(g) for g in groups]
        self.max_seq_len, self.pad_id = max_seq_len, pad_id

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return pack_row([self.examples[i] for i in self.groups[int(index)]], self.max_seq_len, self.pad_id)


# ----------------------------------------------------------------------------------------------- reading & config

@dataclass(frozen=True)
class InstructDataConfig:
    """Instruction JSONL files (``{instruction, context?, response, id?}``) and how to batch them."""

    path: str | None = None
    eval_path: str | None = None
    tokenizer: str | None = None
    max_seq_len: int = 4000
    pack: bool = False
    seed: int = 0
    skip_bad_lines: bool = False  # also skips (and counts) examples too long even with an empty context

    def validate(self) -> None:
        if self.max_seq_len < 8:
            raise UserError(f"data.max_seq_len must be at least 8, got {self.max_seq_len}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"data.seed must be in [0, 2**32), got {self.seed}")


def alpaca_input_problem(record: dict) -> str | None:
    """What is wrong with a record's Alpaca ``input`` field, or None: the fields are instruction, context,
    response, so text in ``input`` would not be read (an empty or null ``input``, Alpaca's "no input", loses
    nothing)."""
    if record.get("input") in (None, ""):
        return None
    if record.get("context") is None:
        return "field 'input' is not read; rename it to 'context' (the fields are instruction, context, response)"
    return "fields 'input' and 'context' both given; only 'context' is read: merge 'input' into it or remove it"


def prompt_field_problem(record: dict, test: bool = False) -> str | None:
    """A record's ``prompt`` field where prompts are built from instruction and context (training; ``test``: the
    task runner's test records), or None: its text would not be read."""
    if "prompt" not in record:
        return None
    return ("field 'prompt' is not read here (the prompt is built from 'instruction' and 'context'); rename it to "
            "'context'" + (", or decode ready-made prompts with launch/generate.py" if test else ""))


def unread_fields_problem(record: dict, test: bool = False) -> str | None:
    """``alpaca_input_problem`` or ``prompt_field_problem``: text in a field the instruction format does not read."""
    return alpaca_input_problem(record) or prompt_field_problem(record, test)


def refuse_alpaca_input(where: str, record: dict) -> None:
    """``alpaca_input_problem`` as a UserError naming ``where`` (a file:line), rather than text silently not read."""
    problem = alpaca_input_problem(record)
    if problem is not None:
        raise UserError(f"{where}: {problem}")


def read_instruct_jsonl(path: str, skip_bad_lines: bool = False, training: bool = False) -> tuple[list[dict], int]:
    """``{instruction, context, response, id}`` records (``id`` defaults to ``path:line``) and skipped lines.

    A line with text in a field that is not read (Alpaca's ``input``, generate.py's ``prompt``) or an empty
    instruction or response is a bad line
    (an empty response would teach the model to stop at once), refused or, with ``skip_bad_lines``, counted."""
    records, skipped = read_jsonl(path, {"instruction": str, "response": str}, skip_bad_lines,
                                  optional={"context": str, "id": (str, int)}, line_key="_line",
                                  nonempty=("instruction", "response"), check=unread_fields_problem)
    first: dict[tuple[str, str, str], int] = {}
    repeats = []
    for r in records:
        r["id"] = f"{path}:{r['_line']}" + (f" (id {r['id']})" if r.get("id") is not None else "")
        r["context"] = r.get("context") or ""
        key = (r["instruction"], r["context"], r["response"])
        if key in first:
            repeats.append((r["_line"], first[key]))
        first.setdefault(key, r["_line"])
    if repeats and training:  # kept (a user may weight examples so); a file concatenated twice should not pass unseen
        log.warning("%s: %d line(s) repeat an earlier example word for word (first: line %d repeats line %d); each "
                    "is trained as often as it appears", path, len(repeats), *repeats[0])
    return records, skipped


def encode_examples(tokenizer, records: Sequence[dict], max_seq_len: int, skip_too_long: bool = False
                    ) -> tuple[list[EncodedExample], dict[str, int]]:
    """Encode records; count truncated contexts and (with ``skip_too_long``) examples that cannot fit at all.
    Records are checked as ``read_instruct_jsonl`` checks lines (string fields, a non-empty instruction and
    response, no Alpaca ``input`` field), so examples given in memory are held to the same rules."""
    out: list[EncodedExample] = []
    stats = {"examples": 0, "truncated_examples": 0, "context_tokens_cut": 0, "skipped_too_long": 0,
             "loss_tokens": 0, "tokens": 0}
    training_eos_id(tokenizer)  # a tokenizer without EOS is one error, not every example "too long"
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"example {i} must be a dict, got {type(r).__name__}")
        for key in ("instruction", "response", "context"):
            if not isinstance(r.get(key), str) and (key != "context" or r.get(key) is not None):
                got = f", got {json_type_name(r[key])}" if key in r else f" (missing){renamed_field_hint(key, r)}"
                raise UserError(f"{r.get('id', f'example {i}')}: '{key}' must be a string{got}")
            if key != "context" and not r[key].strip():  # as read_instruct_jsonl refuses such a line
                raise UserError(f"{r.get('id', f'example {i}')}: '{key}' is empty")
        problem = unread_fields_problem(r)
        if problem:
            raise UserError(f"{r.get('id', f'example {i}')}: {problem}")
        try:
            ex = encode_example(tokenizer, r["instruction"], r.get("context") or "", r["response"], max_seq_len,
                                example_id=str(r.get("id", f"example {i}")))
        except UserError as e:
            if not skip_too_long:
                raise UserError(f"{e} (or skip such examples, counted: --skip-bad-lines, data.skip_bad_lines=true)"
                                ) from None
            stats["skipped_too_long"] += 1
            if stats["skipped_too_long"] <= 5:  # named, as skipped bad lines are (the message holds no note text)
                log.warning("skipping %s%s", e, "" if stats["skipped_too_long"] < 5 else " (further ones: counted)")
            continue
        out.append(ex)
        stats["examples"] += 1
        stats["truncated_examples"] += int(ex.context_tokens_cut > 0)
        stats["context_tokens_cut"] += ex.context_tokens_cut
        stats["loss_tokens"] += len(ex.tokens) - ex.prompt_len
        stats["tokens"] += len(ex.tokens)
    stats["digest"] = content_digest(a for ex in out for a in (ex.tokens, [ex.prompt_len]))
    return out, stats


def steps_for_epochs(num_rows: int, global_batch: int, epochs: float = 1.0) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_rows`` rows, as HF Trainer counts them: ``ceil(num_rows /
    global_batch)`` per epoch (the last batch of an epoch is short), times ``epochs``, rounded up."""
    return max(1, math.ceil(epochs * math.ceil(num_rows / global_batch)))


def epoch_batches(rows: Any, seed: int, global_batch: int, seq_len: int, pad_id: int, process_index: int = 0,
                  process_count: int = 1, read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Infinite batches in whole epochs, as HF Trainer batches them: epoch ``e`` is a seeded shuffle of every row
    (its own per epoch), cut into ``ceil(n / global_batch)`` batches, so each row is seen once per epoch; an
    epoch's short last batch is filled with padding rows (no loss). This process keeps its rows of each batch."""
    lo, hi = check_process_split(global_batch, process_index, process_count)
    n = len(rows)
    if n == 0:
        raise UserError("no training rows")
    per_epoch = -(-n // global_batch)

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batch(k: int) -> Batch:
        epoch, j = divmod(int(k), per_epoch)
        picked = order(epoch)[j * global_batch:(j + 1) * global_batch]
        return take_rows(pad_rows([rows[int(i)] for i in picked], global_batch, seq_len, pad_id), lo, hi)

    ds = grain.MapDataset.range(sys.maxsize).map(batch)
    return ds.to_iter_dataset(read_options=read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


@dataclass
class InstructData:
    """Encoded train/eval rows, their counts, and the batch iterators."""

    cfg: InstructDataConfig
    pad_id: int
    train: InstructRows
    eval: InstructRows | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.train)

    def steps_per_epoch(self, global_batch: int) -> int:
        return steps_for_epochs(self.num_rows, global_batch, 1.0)

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        return steps_for_epochs(self.num_rows, global_batch, epochs)

    def train_dataset(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
        return epoch_batches(self.train, self.cfg.seed, global_batch, self.cfg.max_seq_len, self.pad_id,
                             process_index, process_count, read_options)

    def train_iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                       read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
        """Infinite; reshuffled every epoch; ``get_state``/``set_state`` resume exactly; this process's rows."""
        return iter(self.train_dataset(global_batch, process_index, process_count, read_options))

    def eval_batches(self, global_batch: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
        if self.eval is None:
            return []
        return fixed_batches([self.eval], global_batch, self.cfg.max_seq_len, self.pad_id, process_index,
                             process_count)


def _rows(tokenizer, cfg: InstructDataConfig, records: Sequence[dict], prefix: str) -> tuple[InstructRows, dict]:
    examples, stats = encode_examples(tokenizer, records, cfg.max_seq_len, cfg.skip_bad_lines)
    if not examples:
        raise UserError(f"{prefix}: no usable examples")
    if cfg.pack:
        order = np.random.default_rng(cfg.seed).permutation(len(examples))  # mix lengths before packing
        examples = [examples[i] for i in order]
    rows = InstructRows(examples, pack_groups(examples, cfg.max_seq_len, cfg.pack), cfg.max_seq_len,
                        tokenizer.pad_id)
    stats["rows"] = len(rows)
    stats["padding_fraction"] = 1.0 - (stats["tokens"] - stats["examples"]) / (len(rows) * cfg.max_seq_len)
    return rows, stats


def build_instruct_data(cfg: InstructDataConfig, tokenizer=None, examples: Sequence[dict] | None = None,
                        eval_examples: Sequence[dict] | None = None) -> InstructData:
    """Read ``cfg.path`` (or take in-memory ``examples``), encode, group into rows; ``stats`` counts everything."""
    cfg.validate()
    if tokenizer is None:
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    skipped = 0
    if examples is None:
        if not cfg.path:
            raise UserError("no instruction data: set data.path (a JSONL file) or pass examples")
        examples, skipped = read_instruct_jsonl(cfg.path, cfg.skip_bad_lines, training=True)
    eval_skipped = 0
    if eval_examples is None and cfg.eval_path:
        eval_examples, eval_skipped = read_instruct_jsonl(cfg.eval_path, cfg.skip_bad_lines)
    train, stats = _rows(tokenizer, cfg, examples, cfg.path or "examples")
    stats["skipped_lines"] = skipped
    ev = None
    if eval_examples:
        ev, ev_stats = _rows(tokenizer, dataclasses.replace(cfg, pack=False), eval_examples,
                             cfg.eval_path or "eval examples")
        stats["eval"] = {**ev_stats, "skipped_lines": eval_skipped}
        stats["eval_digest"] = ev_stats["digest"]  # data_counts holds no nested dict: the eval set is checked by this
        _warn_held_out_in_training(cfg, examples, eval_examples)
    log.info("instruction data: %d examples in %d rows of %d (%.0f%% padding), %d contexts truncated "
             "(%d tokens), %d too long skipped, %d bad lines skipped", stats["examples"], stats["rows"],
             cfg.max_seq_len, 100 * stats["padding_fraction"], stats["truncated_examples"],
             stats["context_tokens_cut"], stats["skipped_too_long"], skipped)
    if ev is not None:
        _log_eval(stats["eval"])
    return InstructData(cfg, tokenizer.pad_id, train, ev, stats)


def _warn_held_out_in_training(cfg: InstructDataConfig, examples: Sequence[dict], eval_examples: Sequence[dict]
                               ) -> None:
    """One warning (counts and file names, no note text) when held-out examples are also training examples (same
    instruction, context and response): a copy of the training file given as the eval file, or an overlap."""
    import os

    if cfg.path and cfg.eval_path and os.path.exists(cfg.path) and os.path.exists(cfg.eval_path) \
            and os.path.samefile(cfg.path, cfg.eval_path):
        return  # the same file: finetune.py refuses it (or warns once when resuming)

    def key(r):
        return (r.get("instruction"), r.get("context") or "", r.get("response"))

    trained = {key(r) for r in examples}
    shared = sum(key(r) in trained for r in eval_examples)
    if shared:
        files = cfg.path and cfg.eval_path
        log.warning("%s%d of %d held-out examples are also training examples%s (same instruction, context and "
                    "response): their eval loss is partly a training loss; hold out other examples",
                    f"{cfg.eval_path}: " if files else "", shared, len(eval_examples),
                    f" in {cfg.path}" if files else "")


def _log_eval(e: dict) -> None:
    log.info("instruction eval data: %d examples, %d contexts truncated (%d tokens), %d too long skipped, "
             "%d bad lines skipped", e["examples"], e["truncated_examples"], e["context_tokens_cut"],
             e["skipped_too_long"], e["skipped_lines"])


def make_train_iterator(cfg: InstructDataConfig, tokenizer, global_batch: int, process_index: int = 0,
                        process_count: int = 1, *, examples: Sequence[dict] | None = None,
                        data: InstructData | None = None) -> grain.DatasetIterator:
    """Infinite resumable iterator of this process's rows; use ``build_instruct_data`` for ``stats`` and steps."""
    data = data or build_instruct_data(cfg, tokenizer, examples)
    return data.train_iterator(global_batch, process_index, process_count)


def make_eval_batches(cfg: InstructDataConfig, tokenizer, global_batch: int, process_index: int = 0,
                      process_count: int = 1, *, eval_examples: Sequence[dict] | None = None,
                      data: InstructData | None = None) -> list[Batch]:
    """Unpacked eval rows in order, as batches (the last padded with ``loss_mask`` 0 rows)."""
    if data is not None:
        return data.eval_batches(global_batch, process_index, process_count)
    cfg.validate()
    if tokenizer is None:
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    skipped = 0
    if eval_examples is None:
        if not cfg.eval_path:
            raise UserError("no instruction eval data: set data.eval_path or pass eval_examples")
        eval_examples, skipped = read_instruct_jsonl(cfg.eval_path, cfg.skip_bad_lines)
    rows, stats = _rows(tokenizer, dataclasses.replace(cfg, pack=False), eval_examples,
                        cfg.eval_path or "eval examples")
    _log_eval({**stats, "skipped_lines": skipped})
    return fixed_batches([rows], global_batch, cfg.max_seq_len, tokenizer.pad_id, process_index, process_count)
