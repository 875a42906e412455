"""Continued-pretraining data: documents → ``[bos] ids [eos]`` stream → fixed blocks → shuffled, mixed Grain batches.

Every batch is a dict of int32 ``[B, T]`` numpy arrays ``inputs, targets, loss_mask, segment_ids, positions``
(``targets[t]`` follows ``inputs[t]``; ``segment_ids`` 1, 2, … per document within a row, 0 for padding).

Two packing modes (``segment_mask``):

* ``True`` (default): each document piece in a row is its own segment, positions restart at 0 where a segment
  starts in the row (a document continued from the previous row starts again at 0: the row is its whole context),
  and the target that crosses a document boundary (EOS → next document's BOS) is masked. The last target of a row
  is the next token of the stream when there is one (the loss then covers every token of the block).
* ``False`` blocks as HF ``group_texts`` of the authors' script attends and scores them: one segment per row,
  positions ``0..T-1``, attention across documents, and — as in HF, where labels are shifted inside the block —
  the last position of every row has no target (masked), so each block gives ``T - 1`` predictions. The stream
  itself still differs from the authors': every document ends with an EOS here (their ``tokenizer(text)`` adds the
  BOS only), and the tail is dropped once per source (``group_texts`` drops one per 1,000-document map batch).

The final incomplete block of a training stream is dropped (like ``group_texts``) and counted in ``stats``; eval
streams keep their tail as a padded block. The whole corpus is tokenised up front in memory: fine for the
synthetic and pilot corpora; a memory-mapped token cache (tokenise once, ``np.memmap`` the stream and the document
offsets, ``PackedBlocks`` reads slices of it unchanged) is the next step for the paper's 7 GB of notes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np

from cancerllm_jax.data.sources import content_digest, read_documents
from cancerllm_jax.data.tokenizer import bos_ids, training_eos_id
from cancerllm_jax.errors import UserError

log = logging.getLogger(__name__)

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class PretrainDataConfig:
    """Where the pretraining text comes from and how it is cut into blocks."""

    sources: list[str] | None = None  # paths / globs / folders of .jsonl ({"text": ...}) or .txt; None: documents=
    weights: list[float] | None = None  # mixture weights, one per sources entry (e.g. 15:1:4); None: one stream
    # (a JSONL line's own "source" field does not pick its component: give each kind of text its own entry)
    tokenizer: str | None = None  # see data.tokenizer.load_tokenizer; None: Mistral v1
    block_size: int = 3000
    segment_mask: bool = True
    eval_fraction: float = 0.01  # fraction of DOCUMENTS (per source) held out for eval loss
    seed: int = 0
    skip_bad_lines: bool = False
    text_field: str = "text"

    def validate(self) -> None:
        if isinstance(self.sources, (str, bytes, os.PathLike)):  # would be read as one path per character
            raise UserError(f"data.sources must be a list of paths, got one path: use [{os.fspath(self.sources)!r}]")
        if self.block_size < 2:
            raise UserError(f"data.block_size must be at least 2, got {self.block_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"data.seed must be in [0, 2**32), got {self.seed}")
        if self.weights is not None:
            if not all(0 < w < float("inf") for w in self.weights):  # NaN fails too
                raise UserError(f"data.weights must all be positive and finite, got {self.weights}")
            if self.sources is not None and len(self.weights) != len(self.sources):
                raise UserError(f"data.weights has {len(self.weights)} entries but data.sources has "
                                f"{len(self.sources)}: give one weight per source")


# ----------------------------------------------------------------------------------------------- tokenise & pack

def strip_special(ids: Sequence[int], tokenizer) -> list[int]:
    """``ids`` without a leading BOS or trailing EOS (for tokenizers whose ``encode`` adds them anyway)."""
    ids = list(ids)
    while ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    while ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return ids


def tokenize_documents(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token stream ``[bos] doc0 [eos] [bos] doc1 [eos] …`` (int32; no ``[bos]`` for a tokenizer without one)
    and each document's start offset (int64)."""
    pieces, starts, offset = [], [], 0
    bos, eos = bos_ids(tokenizer), [training_eos_id(tokenizer)]
    for text in texts:
        ids = bos + strip_special(tokenizer.encode(text), tokenizer) + eos
        pieces.append(np.asarray(ids, dtype=np.int32))
        starts.append(offset)
        offset += len(ids)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return tokens, np.asarray(starts, dtype=np.int64)


class PackedBlocks:
    """Random-access rows of ``block_size`` tokens cut from one token stream (a Grain data source).

    ``pad_tail=False`` drops the final incomplete block (``dropped_tokens`` counts it); ``True`` pads it.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, block_size: int, *, segment_mask: bool = True,
                 pad_id: int = 0, pad_tail: bool = False):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.block_size = int(block_size)
        self.segment_mask = segment_mask
        self.pad_id = int(pad_id)
        n = len(self.tokens)
        self.num_blocks = -(-n // block_size) if pad_tail else n // block_size
        self.dropped_tokens = max(0, n - self.num_blocks * block_size)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range [0, {self.num_blocks})")
        T, n, toks = self.block_size, len(self.tokens), self.tokens
        lo = index * T
        hi = min(lo + T, n)
        length = hi - lo
        row = {k: np.zeros(T, np.int32) for k in FIELDS}
        row["inputs"][:] = self.pad_id
        row["targets"][:] = self.pad_id
        row["inputs"][:length] = toks[lo:hi]
        if self.segment_mask:
            n_targets = min(lo + T + 1, n) - lo - 1  # the row's last target may be the stream's next token
        else:
            n_targets = length - 1  # HF group_texts: no target for the block's last token
        row["targets"][:n_targets] = toks[lo + 1:lo + 1 + n_targets]
        row["loss_mask"][:n_targets] = 1
        if not self.segment_mask:
            row["segment_ids"][:length] = 1
            row["positions"][:length] = np.arange(length, dtype=np.int32)
            return row
        idx = np.arange(lo, hi)
        doc = np.searchsorted(self.doc_starts, idx, side="right") - 1
        row["segment_ids"][:length] = doc - doc[0] + 1
        row["positions"][:length] = idx - np.maximum(self.doc_starts[doc], lo)
        # Mask the target that is the first token (BOS) of the next document.
        tgt_idx = np.arange(lo + 1, lo + 1 + n_targets)
        k = np.minimum(np.searchsorted(self.doc_starts, tgt_idx), len(self.doc_starts) - 1)
        crosses = self.doc_starts[k] == tgt_idx
        row["loss_mask"][:n_targets][crosses] = 0
        return row

    def __repr__(self) -> str:
        return (f"PackedBlocks(blocks={self.num_blocks}, block_size={self.block_size}, "
                f"segment_mask={self.segment_mask}, dropped_tokens={self.dropped_tokens})")


def split_documents(docs: Sequence[dict], eval_fraction: float, seed: int,
                    sides: dict[str, bool] | None = None) -> tuple[list[dict], list[dict]]:
    """A seeded split by DOCUMENT: ``(train, eval)``, each keeping the input order.

    With ``eval_fraction > 0`` and at least two different documents, at least one document goes to each side.
    Documents of the same text (copied-forward notes, a file copied under another name) always go to the same side,
    so no held-out text is also trained on: ``sides`` (text → held out), shared by the calls for one corpus, carries
    that choice across sources. A text is held out only when all its copies fit in the eval share (boilerplate
    repeated thousands of times trains). Without repeated texts the split is the plain seeded permutation's.
    """
    n = len(docs)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    if n_eval <= 0:
        return list(docs), []
    sides = {} if sides is None else sides
    size: dict[str, int] = {}
    for d in docs:
        size[d["text"]] = size.get(d["text"], 0) + 1
    held, mine = 0, []
    for i in np.random.default_rng(seed).permutation(n):  # each text's side: where its first drawn copy falls,
        text = docs[i]["text"]  # held out only while all its copies fit (a note repeated 5,000 times trains)
        if text not in sides:
            sides[text] = held + size[text] <= n_eval
            held += size[text] if sides[text] else 0
            mine.append(text)
    is_eval = [sides[d["text"]] for d in docs]
    if all(is_eval) and mine:  # too few different texts: the last one drawn here trains
        sides[mine[-1]] = False
        is_eval = [sides[d["text"]] for d in docs]
    elif not any(is_eval) and len(mine) >= 2:  # every text has more copies than the eval share: the drawn text
        fewest = min(mine, key=lambda t: size[t])  # with the fewest copies is held out (the others train), unless
        if size[fewest] <= 2 * n_eval:  # that is far more than the share (5,000 copies of one text, 3,000 of another)
            sides[fewest] = True
            is_eval = [sides[d["text"]] for d in docs]
    return [d for d, e in zip(docs, is_eval) if not e], [d for d, e in zip(docs, is_eval) if e]


def repeated_documents(docs: Sequence[dict]) -> int:
    """How many documents repeat an earlier one's text word for word (each kept and trained on)."""
    return len(docs) - len({d["text"] for d in docs})


# ------------------------------------------------------------------------------------------- batches & iterators

def check_process_split(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the global batch that belong to ``process_index``."""
    if global_batch < 1:
        raise UserError(f"global batch size must be positive, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise UserError(f"global batch {global_batch} does not divide over {process_count} processes; "
                        f"use a multiple of {process_count}")
    per = global_batch // process_count
    return process_index * per, (process_index + 1) * per


def take_rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows ``[lo, hi)`` of every field of ``batch`` (a process's share of a global batch)."""
    return {k: v[lo:hi] for k, v in batch.items()}


def _source_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_batched_dataset(sources: Sequence[Any], weights: Sequence[float] | None, seed: int, global_batch: int,
                         process_index: int = 0, process_count: int = 1,
                         read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Infinite batches: each source shuffled (anew each epoch) and repeated, mixed by ``weights``, batched to
    ``global_batch``; then this process keeps its contiguous rows ``[i*B/P, (i+1)*B/P)``."""
    lo, hi = check_process_split(global_batch, process_index, process_count)
    for i, src in enumerate(sources):
        if len(src) == 0:
            raise UserError(f"data source {i} has no rows (too little text for one block?)")
    parts = [grain.MapDataset.source(src).shuffle(seed=_source_seed(seed, i)).repeat() for i, src in
             enumerate(sources)]
    if len(parts) == 1:
        ds = parts[0]
    else:
        ds = grain.MapDataset.mix(parts, weights=list(weights) if weights is not None else None)
    ds = ds.batch(global_batch, drop_remainder=True)
    if (lo, hi) != (0, global_batch):
        ds = ds.map(functools.partial(take_rows, lo=lo, hi=hi))
    opts = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return ds.to_iter_dataset(read_options=opts)


def pad_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int, block_size: int, pad_id: int) -> Batch:
    """Stack rows into a batch, filling missing rows with padding (``loss_mask`` and ``segment_ids`` 0)."""
    batch = {k: np.zeros((batch_size, block_size), np.int32) for k in FIELDS}
    batch["inputs"][:] = pad_id
    batch["targets"][:] = pad_id
    for i, row in enumerate(rows):
        for k in FIELDS:
            batch[k][i] = row[k]
    return batch


def fixed_batches(sources: Sequence[Any], global_batch: int, block_size: int, pad_id: int,
                  process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """All rows of ``sources`` in order, in global batches (the last padded), each cut to this process's rows."""
    lo, hi = check_process_split(global_batch, process_index, process_count)
    rows = [src[i] for src in sources for i in range(len(src))]
    return [take_rows(pad_rows(rows[s:s + global_batch], global_batch, block_size, pad_id), lo, hi)
            for s in range(0, len(rows), global_batch)]


class ShuffledRows:
    """The rows of several ``PackedBlocks`` as one sequence, in a seeded order."""

    def __init__(self, sources: Sequence[Any], seed: int):
        self.at = [(s, i) for s, src in enumerate(sources) for i in range(len(src))]
        self.order = np.random.default_rng(_source_seed(seed, 20_000)).permutation(len(self.at))
        self.sources = sources

    def __len__(self) -> int:
        return len(self.at)

    def __getitem__(self, k: int):
        s, i = self.at[self.order[k]]
        return self.sources[s][i]


# ----------------------------------------------------------------------------------------------- the whole corpus

@dataclass
class PretrainData:
    """The packed corpus: per-source train and eval blocks, mixture weights, and what was counted on the way."""

    cfg: PretrainDataConfig
    pad_id: int
    names: list[str]
    train: list[PackedBlocks]
    eval: list[PackedBlocks]
    weights: list[float] | None
    stats: dict[str, Any] = field(default_factory=dict)

    def train_dataset(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
        return make_batched_dataset(self.train, self.weights, self.cfg.seed, global_batch, process_index,
                                    process_count, read_options)

    def train_iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                       read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
        return iter(self.train_dataset(global_batch, process_index, process_count, read_options))

    def eval_batches(self, global_batch: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
        """Every held-out block once, in a seeded order mixing the sources and files (so that the first batches,
        all an ``eval_batches`` cap reads, are a sample of the whole split, not its first source or file)."""
        return fixed_batches([ShuffledRows(self.eval, self.cfg.seed)], global_batch, self.cfg.block_size,
                             self.pad_id, process_index, process_count)


def _group_documents(cfg: PretrainDataConfig, documents: Sequence[dict] | None) -> tuple[list[str], list[list[dict]],
                                                                                         int]:
    """Mixture components: with weights, one per ``cfg.sources`` entry (or for in-memory documents one per distinct
    ``source``, in first-appearance order); without, one holding every document."""
    if documents is not None:
        for i, d in enumerate(documents):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise UserError(f"document {i} must be a dict with a string 'text', got {type(d).__name__}")
            if not d["text"].strip():
                raise UserError(f"document {i} has an empty 'text'")
        if cfg.weights is None:
            return ["documents"], [list(documents)], 0
        groups: dict[str, list[dict]] = {}
        for d in documents:
            groups.setdefault(str(d.get("source", "documents")), []).append(d)
        if len(groups) != len(cfg.weights):
            raise UserError(f"data.weights has {len(cfg.weights)} entries but the documents come from "
                            f"{len(groups)} sources ({', '.join(groups)})")
        return list(groups), list(groups.values()), 0
    if not cfg.sources:
        raise UserError("no pretraining data: set data.sources (files or globs) or pass documents")
    names, groups, skipped, seen = [], [], 0, {}
    for spec in cfg.sources:
        docs, n_bad = read_documents(spec, cfg.skip_bad_lines, text_field=cfg.text_field, seen=seen)
        names.append(spec)
        groups.append(docs)
        skipped += n_bad
    if cfg.weights is None:  # one stream in source order, not a 1:1 mixture that would oversample a small source
        return [", ".join(names)], [[d for g in groups for d in g]], skipped
    return names, groups, skipped


def build_pretrain_data(cfg: PretrainDataConfig, tokenizer=None, documents: Sequence[dict] | None = None
                        ) -> PretrainData:
    """Read (or take ``documents``), split by document, tokenise and pack every source; log and keep ``stats``."""
    cfg.validate()
    if tokenizer is None:
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    names, groups, skipped = _group_documents(cfg, documents)
    train, evals, per_source, sides = [], [], [], {}
    for i, (name, docs) in enumerate(zip(names, groups)):
        tr_docs, ev_docs = split_documents(docs, cfg.eval_fraction, _source_seed(cfg.seed, 10_000 + i), sides)
        tr = PackedBlocks(*tokenize_documents(tokenizer, [d["text"] for d in tr_docs]), cfg.block_size,
                          segment_mask=cfg.segment_mask, pad_id=tokenizer.pad_id)
        ev = PackedBlocks(*tokenize_documents(tokenizer, [d["text"] for d in ev_docs]), cfg.block_size,
                          segment_mask=cfg.segment_mask, pad_id=tokenizer.pad_id, pad_tail=True)
        if len(tr) == 0:
            held = (f" ({len(ev_docs)} of its {len(docs)} documents, {len(ev.tokens)} tokens, are held out for "
                    f"evaluation: data.eval_fraction=0 trains on all)" if ev_docs else "")
            raise UserError(f"{name}: {len(tr.tokens)} training tokens, fewer than one block of {cfg.block_size}"
                            f"{held}; add text or lower data.block_size")
        train.append(tr)
        evals.append(ev)
        per_source.append({"name": name, "weight": None if cfg.weights is None else cfg.weights[i],
                           "documents": len(docs), "train_documents": len(tr_docs),
                           "eval_documents": len(ev_docs), "train_tokens": len(tr.tokens),
                           "train_blocks": len(tr), "dropped_tail_tokens": tr.dropped_tokens,
                           "eval_tokens": len(ev.tokens), "eval_blocks": len(ev)})
    repeats = repeated_documents([d for g in groups for d in g])
    if repeats:
        log.warning("%d documents repeat another word for word (across all sources); each is kept, and all copies "
                    "of a text are on one side of the train / eval split", repeats)
    stats: dict[str, Any] = {"skipped_lines": skipped, "sources": per_source, "repeated_documents": repeats,
                             "digest": content_digest(a for b in (*train, *evals) for a in (b.tokens, b.doc_starts))}
    for key in ("documents", "train_documents", "eval_documents", "train_tokens", "train_blocks",
                "dropped_tail_tokens", "eval_tokens", "eval_blocks"):
        stats[key] = sum(s[key] for s in per_source)
    log.info("pretraining data: %d documents (%d eval), %d train tokens in %d blocks of %d, %d tail tokens dropped, "
             "%d bad lines skipped", stats["documents"], stats["eval_documents"], stats["train_tokens"],
             stats["train_blocks"], cfg.block_size, stats["dropped_tail_tokens"], skipped)
    if cfg.eval_fraction > 0 and stats["eval_blocks"] == 0:
        log.warning("eval_fraction=%s but no document was held out (too few different documents)", cfg.eval_fraction)
    weights = list(cfg.weights) if cfg.weights is not None and len(train) > 1 else None
    return PretrainData(dataclasses.replace(cfg), tokenizer.pad_id, names, train, evals, weights, stats)


def make_train_iterator(cfg: PretrainDataConfig, tokenizer, global_batch: int, process_index: int = 0,
                        process_count: int = 1, *, documents: Sequence[dict] | None = None,
                        data: PretrainData | None = None) -> grain.DatasetIterator:
    """An infinite, resumable (``get_state``/``set_state``) iterator of this process's rows of each global batch.

    Pass ``data`` (from ``build_pretrain_data``) to reuse a tokenised corpus and read its ``stats``.
    """
    data = data or build_pretrain_data(cfg, tokenizer, documents)
    return data.train_iterator(global_batch, process_index, process_count)


def make_eval_batches(cfg: PretrainDataConfig, tokenizer, global_batch: int, process_index: int = 0,
                      process_count: int = 1, *, documents: Sequence[dict] | None = None,
                      data: PretrainData | None = None) -> list[Batch]:
    """The held-out documents' blocks as a list of batches; the last is padded with ``loss_mask`` 0 rows."""
    data = data or build_pretrain_data(cfg, tokenizer, documents)
    return data.eval_batches(global_batch, process_index, process_count)

