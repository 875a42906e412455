"""Pretraining pipeline: packing, document split, mixture, resumable per-process Grain iterators."""
from __future__ import annotations

import collections
import importlib.util
import json

import numpy as np
import pytest

from cancerllm_jax.data.pretrain import (
    FIELDS,
    PackedBlocks,
    PretrainDataConfig,
    build_pretrain_data,
    make_eval_batches,
    make_train_iterator,
    split_documents,
    tokenize_documents,
)
from cancerllm_jax.errors import UserError


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("the Mistral v1 tokenizer ships in mistral-common, which is not installed")
    from cancerllm_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def stream(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A fake ``[bos] … [eos]`` stream: BOS 1, EOS 2, body tokens unique (100, 101, …)."""
    toks, starts, nxt = [], [], 100
    for n in lengths:
        starts.append(len(toks))
        toks += [1] + list(range(nxt, nxt + n)) + [2]
        nxt += n
    return np.asarray(toks, np.int32), np.asarray(starts)


def reference_row(tokens, starts, T, i):
    """A slow, obviously-correct segment-masked row."""
    doc_of = np.zeros(len(tokens), int)
    for d, s in enumerate(starts):
        doc_of[s:] = d
    lo = i * T
    row = {k: [] for k in FIELDS}
    for t in range(lo, lo + T):
        if t >= len(tokens):
            row["inputs"].append(0)
            row["targets"].append(0)
            row["loss_mask"].append(0)
            row["segment_ids"].append(0)
            row["positions"].append(0)
            continue
        row["inputs"].append(tokens[t])
        has_next = t + 1 < len(tokens)
        row["targets"].append(tokens[t + 1] if has_next else 0)
        row["loss_mask"].append(int(has_next and (t + 1) not in set(starts)))
        row["segment_ids"].append(doc_of[t] - doc_of[lo] + 1)
        row["positions"].append(t - max(starts[doc_of[t]], lo))
    return {k: np.asarray(v, np.int32) for k, v in row.items()}


def test_packing_by_hand():
    tokens, starts = stream([3, 1, 4])  # docs of 5, 3 and 6 tokens -> 14 tokens
    blocks = PackedBlocks(tokens, starts, 4, segment_mask=True)
    assert len(blocks) == 3 and blocks.dropped_tokens == 2
    r0, r1 = blocks[0], blocks[1]
    np.testing.assert_array_equal(r0["inputs"], [1, 100, 101, 102])
    np.testing.assert_array_equal(r0["targets"], [100, 101, 102, 2])  # last target: the next token of the stream
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 1, 1])
    np.testing.assert_array_equal(r1["inputs"], [2, 1, 103, 2])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 2, 2, 2])
    np.testing.assert_array_equal(r1["positions"], [0, 0, 1, 2])
    np.testing.assert_array_equal(r1["loss_mask"], [0, 1, 1, 0])  # EOS -> next BOS is masked, twice
    for r in (r0, r1):
        assert all(r[k].dtype == np.int32 and r[k].shape == (4,) for k in FIELDS)


@pytest.mark.parametrize("T", [2, 3, 5, 8, 13])
def test_packing_matches_reference(T):
    tokens, starts = stream([0, 7, 2, 11, 1, 5])
    blocks = PackedBlocks(tokens, starts, T, segment_mask=True)
    assert len(blocks) == len(tokens) // T and blocks.dropped_tokens == len(tokens) % T
    for i in range(len(blocks)):
        ref = reference_row(tokens, starts, T, i)
        for k in FIELDS:
            np.testing.assert_array_equal(blocks[i][k], ref[k], err_msg=f"row {i} field {k}")
    padded = PackedBlocks(tokens, starts, T, segment_mask=True, pad_tail=True)
    assert padded.dropped_tokens == 0 and len(padded) == -(-len(tokens) // T)
    last = padded[len(padded) - 1]
    ref = reference_row(tokens, starts, T, len(padded) - 1)
    for k in FIELDS:
        np.testing.assert_array_equal(last[k], ref[k])


def test_group_texts_mode():
    tokens, starts = stream([3, 1, 4])
    blocks = PackedBlocks(tokens, starts, 4, segment_mask=False)
    r1 = blocks[1]
    np.testing.assert_array_equal(r1["inputs"], [2, 1, 103, 2])
    np.testing.assert_array_equal(r1["targets"][:3], [1, 103, 2])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(r1["positions"], [0, 1, 2, 3])
    np.testing.assert_array_equal(r1["loss_mask"], [1, 1, 1, 0])  # no boundary masking; HF: no target at the end


def test_tokenize_documents_adds_bos_and_eos(tok):
    tokens, starts = tokenize_documents(tok, ["Tumor size 2 cm.", "ER positive."])
    a, b = tok.encode("Tumor size 2 cm."), tok.encode("ER positive.")
    assert tokens.tolist() == [tok.bos_id, *a, tok.eos_id, tok.bos_id, *b, tok.eos_id]
    assert starts.tolist() == [0, len(a) + 2]


def test_split_is_by_document_and_seeded():
    docs = [{"text": f"d{i}"} for i in range(50)]
    tr, ev = split_documents(docs, 0.1, seed=3)
    assert len(ev) == 5 and len(tr) == 45 and not {d["text"] for d in tr} & {d["text"] for d in ev}
    assert split_documents(docs, 0.1, seed=3) == (tr, ev) and split_documents(docs, 0.1, seed=4)[1] != ev
    assert split_documents(docs[:3], 0.01, seed=0)[1] != []  # at least one eval document


def test_repeated_texts_never_straddle_the_split():
    """Copied-forward notes, or a file copied under another name: every copy of a text is on one side (the eval set
    held texts that were also trained on); without repeats the split is the plain permutation's, as before."""
    plain = [{"text": f"d{i}"} for i in range(40)]
    want = np.random.default_rng(3).permutation(40)[:4]
    assert sorted(int(d["text"][1:]) for d in split_documents(plain, 0.1, seed=3)[1]) == sorted(want.tolist())
    twice = [{"text": f"d{i % 20}"} for i in range(40)]  # every note twice
    for seed in range(5):
        tr, ev = split_documents(twice, 0.1, seed=seed)
        assert ev and tr and not {d["text"] for d in tr} & {d["text"] for d in ev}
    boiler = [{"text": f"u{i}"} for i in range(400)] + [{"text": "Patient did not attend."}] * 100  # boilerplate
    for seed in range(5):
        tr, ev = split_documents(boiler, 0.05, seed=seed)
        assert len(ev) == 25 and all(d["text"] != "Patient did not attend." for d in ev)
    for docs, fraction in (([{"text": f"n{i % 10}"} for i in range(20)], 0.05),  # each of 10 notes twice, 1 held out
                           ([{"text": t} for t in "AABB"], 0.25)):
        tr, ev = split_documents(docs, fraction, seed=0)  # no text fits the eval share: one is held out all the same
        assert ev and tr and len({d["text"] for d in ev}) == 1 and not {d["text"] for d in tr} & {ev[0]["text"]}
    two = [{"text": "A"}] * 5000 + [{"text": "B"}] * 3000  # holding either out is far more than 5 %: neither is
    assert split_documents(two, 0.05, seed=0) == (two, [])
    same = [{"text": "x"}] * 3  # one text: nothing can be held out without being trained on
    assert split_documents(same, 0.5, seed=0) == (same, [])
    sides: dict = {}  # two sources sharing texts (one file copied under another name) follow one choice
    a = split_documents(plain, 0.1, seed=1, sides=sides)
    b = split_documents(list(reversed(plain)), 0.1, seed=2, sides=sides)
    assert {d["text"] for d in a[1]} == {d["text"] for d in b[1]}


def test_eval_rows_mix_sources_and_duplicates_are_counted(tok, caplog):
    """A capped evaluation (``eval_batches``) reads the first batches: they mix both sources (all came from the
    first); repeated documents are named in a warning and counted."""
    import logging

    docs = notes(60, "a") + notes(60, "b") + notes(3, "a")[:2]
    cfg = PretrainDataConfig(block_size=16, eval_fraction=0.3, seed=0, weights=[1, 1])
    with caplog.at_level(logging.WARNING):
        data = build_pretrain_data(cfg, tok, documents=docs)
    assert data.stats["repeated_documents"] == 2 and "2 documents repeat another word for word" in caplog.text
    first = make_eval_batches(cfg, tok, 8, data=data)[0]
    a_ids = {int(t) for blk in data.eval[0].tokens.reshape(1, -1) for t in blk}
    b_ids = {int(t) for blk in data.eval[1].tokens.reshape(1, -1) for t in blk}
    rows = [set(r.tolist()) for r in first["inputs"]]
    assert any(r <= a_ids and r - b_ids for r in rows) and any(r <= b_ids and r - a_ids for r in rows)
    full = make_eval_batches(cfg, tok, 8, data=data)  # still every held-out block exactly once
    assert sum(int(b["loss_mask"].sum()) for b in full) == data.stats["eval_tokens"] - data.stats["eval_documents"]


def notes(n: int, source: str = "notes") -> list[dict]:
    return [{"text": f"Patient {i} ({source}): stage {i % 4} breast cancer, ER {'+' if i % 2 else '-'}. " * (1 + i % 4),
             "source": source} for i in range(n)]


def test_stats_count_everything(tok):
    cfg = PretrainDataConfig(block_size=32, eval_fraction=0.1, seed=0)
    data = build_pretrain_data(cfg, tok, documents=notes(40))
    s = data.stats
    assert s["documents"] == 40 and s["eval_documents"] == 4 and s["train_documents"] == 36
    assert s["train_blocks"] * 32 + s["dropped_tail_tokens"] == s["train_tokens"]
    assert 0 <= s["dropped_tail_tokens"] < 32 and s["eval_blocks"] == -(-s["eval_tokens"] // 32)
    whole = PretrainDataConfig(block_size=32, eval_fraction=0.0)  # --resume's digest: content and order
    a, b = (build_pretrain_data(whole, tok, documents=d).stats for d in (notes(40), notes(40)[::-1]))
    assert a["train_tokens"] == b["train_tokens"] and a["digest"] != b["digest"]
    assert build_pretrain_data(whole, tok, documents=notes(40)).stats["digest"] == a["digest"]


def test_iterator_state_restores_exactly(tok):
    cfg = PretrainDataConfig(block_size=32, eval_fraction=0.0, seed=7)
    data = build_pretrain_data(cfg, tok, documents=notes(30))
    it = data.train_iterator(4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = make_train_iterator(cfg, tok, 4, documents=notes(30))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == np.int32 and got[k].shape == (4, 32)


def test_process_rows_concatenate_to_the_global_batch(tok):
    data = build_pretrain_data(PretrainDataConfig(block_size=16, eval_fraction=0.0), tok, documents=notes(20))
    whole, p0, p1 = data.train_iterator(6), data.train_iterator(6, 0, 2), data.train_iterator(6, 1, 2)
    for _ in range(3):
        g, a, b = next(whole), next(p0), next(p1)
        for k in FIELDS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
    with pytest.raises(UserError, match="does not divide"):
        data.train_iterator(5, 0, 2)


def test_infinite_with_a_new_shuffle_each_epoch(tok):
    data = build_pretrain_data(PretrainDataConfig(block_size=16, eval_fraction=0.0), tok, documents=notes(12))
    n = len(data.train[0])
    it = data.train_iterator(1)
    keys = [next(it)["inputs"].tobytes() for _ in range(3 * n)]
    epochs = [keys[e * n:(e + 1) * n] for e in range(3)]
    every = sorted(data.train[0][i]["inputs"].tobytes() for i in range(n))
    assert all(sorted(e) == every for e in epochs) and epochs[0] != epochs[1]


def test_mixture_weights_are_respected(tok):
    docs = notes(40, "literature") + notes(10, "clinical") + notes(20, "general")
    cfg = PretrainDataConfig(block_size=16, eval_fraction=0.0, weights=[15, 1, 4])
    data = build_pretrain_data(cfg, tok, documents=docs)
    assert data.names == ["literature", "clinical", "general"]
    owner = {src[i]["inputs"].tobytes(): k for k, src in enumerate(data.train) for i in range(len(src))}
    it = data.train_iterator(20)
    counts = collections.Counter(owner[row.tobytes()] for _ in range(20) for row in next(it)["inputs"])
    frac = np.array([counts[k] for k in range(3)]) / 400
    np.testing.assert_allclose(frac, [0.75, 0.05, 0.20], atol=0.03)


def test_eval_batches_pad_with_masked_rows(tok):
    cfg = PretrainDataConfig(block_size=32, eval_fraction=0.3, seed=1)
    data = build_pretrain_data(cfg, tok, documents=notes(30))
    batches = make_eval_batches(cfg, tok, 4, data=data)
    n = data.stats["eval_blocks"]
    assert len(batches) == -(-n // 4) and n % 4  # a partial last batch exists in this setup
    last = batches[-1]
    assert last["inputs"].shape == (4, 32)
    assert not last["loss_mask"][n % 4:].any() and not last["segment_ids"][n % 4:].any()
    covered = sum(int(b["loss_mask"].sum()) for b in batches)
    # every next-token target is counted once, except the EOS -> BOS crossings between eval documents
    assert covered == data.stats["eval_tokens"] - data.stats["eval_documents"]


def test_reads_sources_from_files_and_counts_bad_lines(tok, tmp_path):
    a = tmp_path / "notes.jsonl"
    a.write_text("\n".join(json.dumps(d) for d in notes(20)) + "\n{broken\n")
    (tmp_path / "reports").mkdir()
    for i, d in enumerate(notes(5, "pathology")):
        (tmp_path / "reports" / f"r{i}.txt").write_text(d["text"])
    cfg = PretrainDataConfig(sources=[str(a), str(tmp_path / "reports" / "*.txt")], weights=[3, 1], block_size=16,
                             eval_fraction=0.1, skip_bad_lines=True)
    data = build_pretrain_data(cfg, tok)
    assert data.stats["skipped_lines"] == 1 and data.stats["documents"] == 25 and len(data.train) == 2
    with pytest.raises(UserError, match=r"notes\.jsonl:21: invalid JSON"):
        build_pretrain_data(PretrainDataConfig(sources=[str(a)], block_size=16), tok)
    with pytest.raises(UserError, match="one weight per source"):
        build_pretrain_data(PretrainDataConfig(sources=[str(a)], weights=[1, 2]), tok)
    one = tmp_path / "reports" / "r0.txt"  # a file named twice (a folder and a file in it, two spellings)
    for sources in ([str(tmp_path / "reports"), str(one)], [str(one), str(tmp_path / "reports" / "." / "r0.txt")]):
        with pytest.raises(UserError, match=r"r0\.txt is named twice in the data sources"):
            build_pretrain_data(PretrainDataConfig(sources=sources, block_size=16), tok)


def test_too_little_text_is_an_error(tok):
    with pytest.raises(UserError, match="fewer than one block"):
        build_pretrain_data(PretrainDataConfig(block_size=4096, eval_fraction=0.0), tok, documents=notes(2))
    docs = [{"text": f"note {i}."} for i in range(3)] + [{"text": "long " * 400}]
    for seed in range(20):  # the held-out documents are named when they took the text (the error said only "add")
        cfg = PretrainDataConfig(block_size=64, eval_fraction=0.05, seed=seed)
        try:
            build_pretrain_data(cfg, tok, documents=docs)
        except UserError as e:
            assert "of its 4 documents" in str(e) and "held out for evaluation: data.eval_fraction=0" in str(e)
            break
    else:
        pytest.fail("no seed held out the long document")


def test_a_missing_text_field_names_the_config_key(tmp_path):
    from cancerllm_jax.data.sources import read_documents

    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"id": 1, "note_text": "Pt with stage II breast cancer.", "kind": "note"}) + "\n")
    with pytest.raises(UserError, match=r"notes\.jsonl:1: missing field 'text' \(the text field is set by "
                                        r"data\.text_field: data\.text_field=note_text reads 'note_text'"):
        read_documents(str(path))
    assert read_documents(str(path), text_field="note_text")[0][0]["text"].startswith("Pt with")


def test_builtin_corpus_weights_pair_with_sorted_sources_whatever_the_seed(tok):
    """The built-in synthetic corpus's first document comes from either source depending on the seed; its
    ``data.weights`` go to the sources in sorted order all the same, and the run says so."""
    from cancerllm_jax.train.config import PretrainConfig
    from cancerllm_jax.train.pretrain import pretrain_data_factory

    said = []
    for seed in (0, 9):
        cfg = PretrainConfig(synthetic_documents=60,
                             data=PretrainDataConfig(block_size=32, eval_fraction=0.0, weights=[5, 1], seed=seed))
        stats = pretrain_data_factory(cfg, said.append)(tok, 0, 1).stats
        assert [(s["name"], s["weight"]) for s in stats["sources"]] == [("clinical_note", 5), ("pathology_report", 1)]
    assert "sorted order: clinical_note, pathology_report" in said[0]


def test_empty_in_memory_document_is_an_error(tok):
    with pytest.raises(UserError, match="document 1 has an empty 'text'"):
        build_pretrain_data(PretrainDataConfig(block_size=16), tok, documents=[{"text": "a note"}, {"text": "  "}])


@pytest.mark.parametrize("weights", [[1.0, float("nan")], [float("inf"), 1.0], [0, 1], [-1, 2]])
def test_bad_mixture_weights_are_refused(weights):
    with pytest.raises(UserError, match="data.weights must all be positive and finite"):
        PretrainDataConfig(sources=["a", "b"], weights=weights).validate()


def test_one_source_path_given_as_a_string_is_refused_not_read_per_character():
    with pytest.raises(UserError, match=r"data.sources must be a list of paths, got one path: use \['notes.jsonl'\]"):
        PretrainDataConfig(sources="notes.jsonl").validate()


def test_sources_without_weights_are_one_stream(tok, tmp_path):
    """``weights: null`` concatenates the sources (each block once per epoch), not a 1:1 mixture that would show a
    small source as often as a large one."""
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("".join(json.dumps(d) + "\n" for d in notes(60, "big")))
    small.write_text("".join(json.dumps(d) + "\n" for d in notes(4, "small")))
    cfg = PretrainDataConfig(sources=[str(big), str(small)], block_size=16, eval_fraction=0.0)
    data = build_pretrain_data(cfg, tok)
    assert len(data.train) == 1 and data.stats["documents"] == 64 and data.weights is None
    n = len(data.train[0])
    it = data.train_iterator(1)
    seen = sorted(next(it)["inputs"].tobytes() for _ in range(n))
    assert seen == sorted(data.train[0][i]["inputs"].tobytes() for i in range(n))  # every block once per epoch
