"""Continued pretraining as a task for the ``Trainer``: the data factory the launcher and the tests share."""
from __future__ import annotations

import sys
from typing import Callable

from cancerllm_jax.errors import UserError
from cancerllm_jax.train.config import MAX_COUNT, PretrainConfig
from cancerllm_jax.train.loop import DataBundle


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain_data_factory(cfg: PretrainConfig, announce: Callable[[str], None] = _stderr) -> Callable:
    """``make_data(tokenizer, process_index, process_count) -> DataBundle`` for ``Trainer``.

    With no ``data.sources`` the built-in synthetic clinical corpus (``cfg.synthetic_documents`` documents) is used.
    """

    def make_data(tokenizer, process_index: int, process_count: int) -> DataBundle:
        return bundle(read_pretrain_data(cfg, tokenizer, process_index, announce), cfg, process_index, process_count)

    return make_data


def read_pretrain_data(cfg: PretrainConfig, tokenizer, process_index: int = 0,
                       announce: Callable[[str], None] = _stderr):
    """The tokenized, packed corpus of ``cfg.data`` (or the built-in synthetic one)."""
    from cancerllm_jax.data.pretrain import build_pretrain_data

    documents = None
    if not cfg.data.sources:
        from cancerllm_jax.data.synthetic import pretrain_documents

        documents = pretrain_documents(cfg.synthetic_documents, seed=cfg.data.seed)
        note = ""
        if cfg.data.weights is not None:  # weights pair with the sources in sorted order, whatever the seed
            documents.sort(key=lambda d: str(d.get("source", "documents")))
            names = sorted({str(d.get("source", "documents")) for d in documents})
            note = f" (data.weights go to its sources in sorted order: {', '.join(names)})"
        if process_index == 0:
            announce(f"data: no data.sources given; using {len(documents)} built-in synthetic clinical "
                     f"documents{note}")
    return build_pretrain_data(cfg.data, tokenizer, documents)


def bundle(data, cfg: PretrainConfig, process_index: int, process_count: int) -> DataBundle:
    """This process's share of ``data`` for the ``Trainer``."""
    return DataBundle(data.train_iterator(cfg.batch_size, process_index, process_count),
                      data.eval_batches(cfg.batch_size, process_index, process_count), data.stats, cfg.data.block_size)


def steps_from_epochs(cfg: PretrainConfig, announce: Callable[[str], None] = _stderr):
    """``(cfg with steps = epochs passes over the train blocks, make_data, base)`` for ``cfg.epochs``: the corpus is
    read (with the base's tokenizer) before the trainer is built, whose schedule needs the steps; ``base`` is what
    ``load_base`` read, for the trainer (None when the tokenizer is named in the config)."""
    import dataclasses
    import jax

    from cancerllm_jax.data.instruct import steps_for_epochs
    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.train.loop import base_for_data

    base, tok_spec = base_for_data(cfg)
    tokenizer = load_tokenizer(tok_spec)
    data = read_pretrain_data(cfg, tokenizer, jax.process_index(), announce)
    blocks = data.stats["train_blocks"]
    steps = steps_for_epochs(blocks, cfg.batch_size, cfg.epochs)
    if steps > MAX_COUNT:
        raise UserError(f"epochs {cfg.epochs:g} of {blocks} blocks in batches of {cfg.batch_size} is more than "
                        "2**31 - 1 steps")
    if jax.process_index() == 0:
        read = steps * cfg.batch_size  # whole batches: what they read past the epochs is counted, not dropped
        wanted = round(cfg.epochs * blocks)
        extra = read - wanted
        next_pass = -(-read // blocks) > -(-wanted // blocks)  # the last batch reaches into another pass
        announce(f"data: {blocks} train blocks of {cfg.data.block_size} tokens; {cfg.epochs:g} epochs in batches of "
                 f"{cfg.batch_size} = {steps} steps" + (
                     f"; {read} blocks read, {extra} past {cfg.epochs:g} epochs (whole batches" + (
                         ": the stream repeats, the last batch fills up from the next pass, where HF's would be "
                         "short)" if next_pass else ")")
                     if extra > 0 else ""))

    def make_data(_tokenizer, process_index: int, process_count: int) -> DataBundle:
        return bundle(data, cfg, process_index, process_count)

    return dataclasses.replace(cfg, steps=steps), make_data, base
