"""Continued pretraining as a task for the ``Trainer``: the data factory the launcher and the tests share."""
from __future__ import annotations

import sys
from typing import Callable

from cancerllm_jax.train.config import PretrainConfig
from cancerllm_jax.train.loop import DataBundle


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain_data_factory(cfg: PretrainConfig, announce: Callable[[str], None] = _stderr) -> Callable:
    """``make_data(tokenizer, process_index, process_count) -> DataBundle`` for ``Trainer``.

    With no ``data.sources`` the built-in synthetic clinical corpus (``cfg.synthetic_documents`` documents) is used.
    """

    def make_data(tokenizer, process_index: int, process_count: int) -> DataBundle:
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
        data = build_pretrain_data(cfg.data, tokenizer, documents)
        return DataBundle(data.train_iterator(cfg.batch_size, process_index, process_count),
                          data.eval_batches(cfg.batch_size, process_index, process_count), data.stats,
                          cfg.data.block_size)

    return make_data
