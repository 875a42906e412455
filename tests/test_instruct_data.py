"""Instruction pipeline: the exact Alpaca template, response-only loss, truncation, packing, iterators."""
from __future__ import annotations

import importlib.util
import json
import zlib

import numpy as np
import pytest

from cancerllm_jax.data.instruct import (
    InstructDataConfig,
    build_instruct_data,
    encode_example,
    encode_prompt,
    make_eval_batches,
    make_train_iterator,
    read_instruct_jsonl,
    render_example,
    render_prompt,
)
from cancerllm_jax.data.pretrain import FIELDS
from cancerllm_jax.errors import UserError

INSTR = "You are a medical expert, this task involves answering the question based on the provided context or text."
CTX = "Pathology: invasive ductal carcinoma, 2.3 cm, left breast, ER positive, PR negative."
RESP = "er"


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("the Mistral v1 tokenizer ships in mistral-common, which is not installed")
    from cancerllm_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def test_templates_are_exact():
    assert render_prompt("Q?", "C.") == ("Below is an instruction that describes a task, paired with an input that "
                                         "provides further context.\n\n### Instruction:\nQ?\n\n### Input:\nC.\n\n"
                                         "### Response:\n")
    assert render_prompt("Q?", "") == "Below is an instruction that describes a task.\n\n### Instruction:\nQ?\n\n" \
                                      "### Response:\n"
    assert render_prompt("Q?", None, for_generation=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ?\n\n### Response:\n")
    assert render_prompt("Q?", "C.", for_generation=True) == render_prompt("Q?", "C.")
    assert render_example("Q?", "C.", "A") == render_prompt("Q?", "C.") + "A"


def test_example_token_by_token(tok):
    ex = encode_example(tok, INSTR, CTX, "pr, her2, er", max_seq_len=512)
    prompt = render_prompt(INSTR, CTX)
    prompt_ids = tok.encode(prompt)
    assert ex.tokens[0] == tok.bos_id and ex.tokens.count(tok.bos_id) == 1  # no doubled BOS
    assert ex.tokens[1:ex.prompt_len] == prompt_ids and ex.prompt_len == 1 + len(prompt_ids)
    assert ex.tokens[-1] == tok.eos_id and ex.tokens.count(tok.eos_id) == 1
    # the response tokens are exactly the continuation of the prompt's tokenisation
    assert tok.encode(prompt + "pr, her2, er") == prompt_ids + ex.tokens[ex.prompt_len:-1]
    assert tok.decode(ex.tokens) == render_example(INSTR, CTX, "pr, her2, er")

    row = ex.row(512, tok.pad_id)
    n = len(ex.tokens) - 1
    np.testing.assert_array_equal(row["inputs"][:n], ex.tokens[:-1])
    np.testing.assert_array_equal(row["targets"][:n], ex.tokens[1:])
    mask = row["loss_mask"]
    first = int(np.argmax(mask))
    assert first == ex.prompt_len - 1  # the target at `first` is the first response token
    assert row["targets"][first] == ex.tokens[ex.prompt_len]
    assert mask[:first].sum() == 0 and mask[first:n].all() and mask[n:].sum() == 0
    assert row["targets"][n - 1] == tok.eos_id and mask[n - 1] == 1  # EOS is a trained target
    assert tok.pad_id != tok.eos_id and (row["inputs"][n:] == tok.pad_id).all()
    np.testing.assert_array_equal(row["segment_ids"], np.r_[np.ones(n), np.zeros(512 - n)])
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    assert tok.decode(row["targets"][mask == 1]) == "pr, her2, er"


class AddsSpecials:
    """A tokenizer whose encode always adds BOS and EOS (as some HF tokenizers do)."""

    def __init__(self, inner):
        self.inner, self.bos_id, self.eos_id, self.pad_id = inner, inner.bos_id, inner.eos_id, inner.pad_id

    def encode(self, text, bos=True, eos=True):
        return self.inner.encode(text, bos=True, eos=True)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_no_doubled_specials_when_encode_adds_them(tok):
    plain = encode_example(tok, INSTR, CTX, RESP, 512)
    odd = encode_example(AddsSpecials(tok), INSTR, CTX, RESP, 512)
    assert odd.tokens == plain.tokens and odd.prompt_len == plain.prompt_len


def test_context_truncation_is_counted_and_keeps_the_response(tok):
    long_ctx = " ".join(f"Finding {i}: no evidence of metastatic disease." for i in range(100))
    response = "metastatic lung cancer with brain mets"
    full = encode_example(tok, INSTR, long_ctx, response, 4000)
    cut = encode_example(tok, INSTR, long_ctx, response, 200)
    assert full.context_tokens_cut == 0 and cut.context_tokens_cut > 0
    assert len(cut.tokens) <= 200 and len(cut.tokens) >= 190
    assert cut.tokens[cut.prompt_len:] == full.tokens[full.prompt_len:]  # response + EOS intact
    text = tok.decode(cut.tokens)
    assert INSTR in text and "### Input:\nFinding 0:" in text and text.endswith("### Response:\n" + response)


def test_too_long_without_context_names_the_example(tok, tmp_path):
    with pytest.raises(UserError, match="ex-7"):
        encode_example(tok, INSTR * 20, CTX, RESP, 64, example_id="ex-7")
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"instruction": "Q?", "context": CTX, "response": RESP}) + "\n"
                 + json.dumps({"instruction": INSTR * 20, "response": RESP}) + "\n")
    with pytest.raises(UserError, match=r"long\.jsonl:2.*--skip-bad-lines, data\.skip_bad_lines=true"):
        build_instruct_data(InstructDataConfig(path=str(p), max_seq_len=64), tok)
    data = build_instruct_data(InstructDataConfig(path=str(p), max_seq_len=64, skip_bad_lines=True), tok)
    assert data.stats["skipped_too_long"] == 1 and data.stats["examples"] == 1


def test_prompt_for_generation_is_truncated_the_same_way(tok):
    ids, cut = encode_prompt(tok, INSTR, CTX * 30, 120, for_generation=True)
    assert len(ids) <= 120 and cut > 0 and ids[0] == tok.bos_id
    assert tok.decode(ids).endswith("### Response:\n")


def test_jsonl_reading(tok, tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"instruction": "Q1", "context": "C1", "response": "A1"}) + "\n"
                 + json.dumps({"instruction": "Q2", "response": "A2", "id": 42}) + "\n")
    records, skipped = read_instruct_jsonl(str(p))
    assert skipped == 0 and records[1]["context"] == "" and records[1]["id"] == f"{p}:2 (id 42)"
    data = build_instruct_data(InstructDataConfig(path=str(p), max_seq_len=128), tok)
    no_ctx = data.train.examples[1]
    assert tok.decode(no_ctx.tokens) == render_example("Q2", "", "A2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Q1", "response": "A1"}) + "\n"
                   + json.dumps({"instruction": "Q2", "context": "C2"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing field 'response'"):
        build_instruct_data(InstructDataConfig(path=str(bad)), tok)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"instruction": "Q", "context": ["x"], "response": "A"}) + "\n")
    with pytest.raises(UserError, match=r"wrong\.jsonl:1: field 'context'"):
        build_instruct_data(InstructDataConfig(path=str(wrong)), tok)
    data = build_instruct_data(InstructDataConfig(path=str(bad), max_seq_len=128, skip_bad_lines=True), tok)
    assert data.stats["skipped_lines"] == 1 and data.stats["examples"] == 1


def examples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        ctx = "" if i % 3 == 0 else f"Note {i}: " + "tumor size 1.{i} cm, grade {i % 3}. " * (1 + i % 5)
        out.append({"instruction": f"What is the tumor size in case {i}?", "context": ctx,
                    "response": f"{1 + i % 4}.{i} cm" + " and more" * (i % 3), "id": f"ex{i}"})
    return out


def toy_loss(batches: list[dict]) -> float:
    """A stand-in model: the loss of a target depends on everything its segment has seen up to it, and nothing else."""
    total, count = 0.0, 0
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg, pos, inp, tgt, mask = (b[k][r] for k in ("segment_ids", "positions", "inputs", "targets",
                                                          "loss_mask"))
            for t in np.flatnonzero(mask):
                visible = (seg == seg[t]) & (pos <= pos[t])
                key = np.concatenate([pos[visible], inp[visible], [tgt[t]]]).astype(np.int32).tobytes()
                total += zlib.crc32(key) / 2**32
                count += 1
    return total / count


def test_packing_gives_the_same_mean_loss(tok):
    cfg = InstructDataConfig(max_seq_len=256, seed=3)
    unpacked = build_instruct_data(cfg, tok, examples=examples(23))
    packed = build_instruct_data(InstructDataConfig(max_seq_len=256, seed=3, pack=True), tok, examples=examples(23))
    assert len(packed.train) < len(unpacked.train) == 23
    assert packed.stats["padding_fraction"] < unpacked.stats["padding_fraction"]
    rows = [packed.train[i] for i in range(len(packed.train))]
    assert max(r["segment_ids"].max() for r in rows) > 1
    for r in rows:  # positions restart at every segment start
        starts = np.flatnonzero(np.diff(np.r_[0, r["segment_ids"]]) != 0)
        assert all(r["positions"][s] == 0 for s in starts if r["segment_ids"][s] > 0)
    u = [{k: v[None] for k, v in unpacked.train[i].items()} for i in range(23)]
    p = [{k: v[None] for k, v in row.items()} for row in rows]
    assert sum(int(b["loss_mask"].sum()) for b in u) == sum(int(b["loss_mask"].sum()) for b in p)
    assert toy_loss(u) == pytest.approx(toy_loss(p), rel=1e-12)


def test_iterator_resumes_and_splits_over_processes(tok):
    cfg = InstructDataConfig(max_seq_len=128, seed=5)
    data = build_instruct_data(cfg, tok, examples=examples(10))
    assert data.steps_per_epoch(4) == 3 and data.steps_for_epochs(5, 4) == 15  # HF Trainer's count
    assert data.steps_for_epochs(1.5, 4) == 5
    it = data.train_iterator(4)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = make_train_iterator(cfg, tok, 4, examples=examples(10))
    again.set_state(state)
    for w in want:
        g = next(again)
        for k in FIELDS:
            np.testing.assert_array_equal(g[k], w[k])
            assert g[k].dtype == np.int32 and g[k].shape == (4, 128)
    whole, a, b = data.train_iterator(4), data.train_iterator(4, 0, 2), data.train_iterator(4, 1, 2)
    for _ in range(4):
        g, x, y = next(whole), next(a), next(b)
        for k in FIELDS:
            np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), g[k])


def test_epochs_are_whole_as_hf_trainer_batches_them(tok):
    """Each epoch is its own shuffle of every row in ceil(n / B) batches: every row once per epoch, the epoch's last
    batch short (padding rows without loss), epochs in different orders."""
    data = build_instruct_data(InstructDataConfig(max_seq_len=128, seed=3), tok, examples=examples(10))
    rows = {data.train[i]["inputs"].tobytes(): i for i in range(len(data.train))}
    it = data.train_iterator(4)
    epochs = []
    for _ in range(3):
        seen = []
        for j in range(3):
            b = next(it)
            real = [r for r in range(4) if b["loss_mask"][r].any()]
            assert len(real) == (2 if j == 2 else 4) and not b["segment_ids"][len(real):].any()
            seen += [rows[b["inputs"][r].tobytes()] for r in real]
        assert sorted(seen) == list(range(10))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]


def test_eval_batches_are_padded_with_masked_rows(tok):
    cfg = InstructDataConfig(max_seq_len=128)
    batches = make_eval_batches(cfg, tok, 4, eval_examples=examples(6))
    assert len(batches) == 2 and batches[1]["inputs"].shape == (4, 128)
    assert not batches[1]["loss_mask"][2:].any() and not batches[1]["segment_ids"][2:].any()
    assert batches[1]["loss_mask"][:2].any()


def _char_tokenizer(folder, bos: bool, eos: bool = True):
    """An HF tokenizer folder over single characters with EOS id 0, no pad and no unk token; with ``bos`` it has a
    BOS that ``tokenizer(text)`` prepends (a post-processor, as Llama's), without one it has none (GPT-2 style)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"</s>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz #:.,\n")}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="#"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>" if eos else None,
                                                bos_token="<s>" if bos else None)
    fast.save_pretrained(folder)
    return fast


@pytest.mark.parametrize("bos", [True, False])
def test_hf_tokenizer_framing_follows_the_tokenizer(tmp_path, bos):
    """A tokenizer without BOS (GPT-2 style) frames documents and examples without one (no -1 ids); pad is never
    EOS, even when EOS is id 0 and there is no pad or unk token; a tokenizer without EOS cannot make training data."""
    from cancerllm_jax.data.pretrain import tokenize_documents
    from cancerllm_jax.data.tokenizer import load_tokenizer

    fast = _char_tokenizer(tmp_path / "tok", bos)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.adds_bos == bos and tok.eos_id == 0 and tok.pad_id not in (0, tok.bos_id)
    assert tok.encode("ab c", bos=True) == fast("ab c")["input_ids"]  # string prompts framed as tokenizer(text)
    head = [1] if bos else []
    stream, starts = tokenize_documents(tok, ["ab", "c"])
    assert stream.tolist() == head + fast.encode("ab", add_special_tokens=False) + [0] + head + [4, 0]
    ex = encode_example(tok, "q", "ctx", "yes", 512)
    assert min(ex.tokens) >= 0 and ex.tokens[:len(head)] == head and ex.tokens[-1] == 0
    assert ex.tokens[:ex.prompt_len] == encode_prompt(tok, "q", "ctx", 512)[0]
    _char_tokenizer(tmp_path / "noeos", bos, eos=False)
    with pytest.raises(UserError, match="no EOS token"):
        tokenize_documents(load_tokenizer(str(tmp_path / "noeos")), ["ab"])


def test_context_cut_inside_a_character_is_not_invented():
    """A byte-level BPE can cut a multi-byte character in two; the kept context is still a prefix of the original
    (no U+FFFD replacement character made up at the cut)."""
    from cancerllm_jax.data.tokenizer import HFTokenizer

    class Bytes(HFTokenizer):  # one token per UTF-8 byte: every cut of a non-ASCII character splits it
        def __init__(self):
            self.bos_id, self.eos_id, self.pad_id, self.adds_bos, self.vocab_size = 256, 257, 258, True, 259

        def encode(self, text, bos=False, eos=False):
            return [256] * bos + list(text.encode()) + [257] * eos

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode(errors="replace")

    tok = Bytes()
    ctx = "tumor size 2 cm " + "\u00e9\U0001f642" * 20
    full, _ = encode_prompt(tok, "q", ctx, 10_000)
    for budget in range(len(full) - 60, len(full)):
        ids, cut = encode_prompt(tok, "q", ctx, budget)
        kept = tok.decode(ids).split("### Input:\n", 1)[1].split("\n\n### Response:", 1)[0]
        assert cut > 0 and ctx.startswith(kept) and "\ufffd" not in kept, (budget, kept[-8:])


@pytest.mark.parametrize("hf", [True, False])
def test_special_token_strings_in_user_text_stay_text(tmp_path, tok, hf):
    """'</s>' or '<|im_end|>' typed in a note is text, never the EOS/BOS token (HF's tokenizer(text) would parse it):
    each document and example holds exactly one EOS, at its end, and no text is stripped as a 'special'."""
    from cancerllm_jax.data.pretrain import tokenize_documents
    from cancerllm_jax.data.tokenizer import load_tokenizer

    if hf:
        _char_tokenizer(tmp_path / "tok", bos=True)
        tok = load_tokenizer(str(tmp_path / "tok"))
    for text in ("a </s>", "<s>b", "c <|im_end|> d"):
        stream, _ = tokenize_documents(tok, [text])
        assert stream.tolist().count(tok.eos_id) == 1 and stream[-1] == tok.eos_id
        assert stream.tolist().count(tok.bos_id) == 1 and stream[0] == tok.bos_id
        ex = encode_example(tok, text, text, text, 512)
        assert ex.tokens.count(tok.eos_id) == 1 and ex.tokens.count(tok.bos_id) == 1
        assert len(ex.tokens) - ex.prompt_len > 2  # the response text is there, not stripped


def test_a_written_prompt_reads_special_token_strings_as_tokenizer_text_does(tmp_path):
    """Generation prompts (``lm.generate([text])``, generate.py's ``prompt``) are encoded as ``tokenizer(text)``: a
    chat template's special-token strings are the special tokens there, while data keeps them as text."""
    from cancerllm_jax.data.tokenizer import encode_written_prompt, load_tokenizer

    fast = _char_tokenizer(tmp_path / "tok", bos=True)
    tok = load_tokenizer(str(tmp_path / "tok"))
    text = "a</s>b<s>c"
    assert encode_written_prompt(tok, text, bos=True) == fast(text)["input_ids"] == [1, 2, 0, 3, 1, 4]
    assert tok.encode(text, bos=True).count(0) == 0  # data: '</s>' is four characters
    sp = load_tokenizer(None)  # Mistral v1: as transformers' LlamaTokenizer from the same .model reads it
    assert encode_written_prompt(sp, "a</s>b<s>c", bos=True) == [1] + sp.encode("a") + [2] + sp.encode("b") + [
        1] + sp.encode("c") == [1, 264, 2, 287, 1, 277]
    assert encode_written_prompt(sp, "<s>[INST] What is the stage? [/INST]", bos=True) == [
        1, 1, 733, 16289, 28793, 1824, 349, 272, 5430, 28804, 733, 28748, 16289, 28793]
    assert sp.encode("a</s>b<s>c", bos=True).count(2) == 0  # data: text


def test_alpaca_input_field_is_not_silently_dropped(tmp_path):
    p = tmp_path / "alpaca.jsonl"
    p.write_text(json.dumps({"instruction": "Q", "context": "C", "response": "A"}) + "\n"
                 + json.dumps({"instruction": "Q", "input": "the note", "response": "A"}) + "\n")
    with pytest.raises(UserError, match=r"alpaca\.jsonl:2: field 'input' is not read; rename it to 'context'"):
        read_instruct_jsonl(str(p))
    records, skipped = read_instruct_jsonl(str(p), skip_bad_lines=True)  # a bad line like the others
    assert (len(records), skipped) == (1, 1)
    both = tmp_path / "both.jsonl"  # text in 'input' beside a 'context' would not be read either
    both.write_text(json.dumps({"instruction": "Q", "context": "C", "input": "", "response": "A"}) + "\n"
                    + json.dumps({"instruction": "Q", "context": "C", "input": "more", "response": "A"}) + "\n")
    with pytest.raises(UserError, match=r"both\.jsonl:2: fields 'input' and 'context' both given"):
        read_instruct_jsonl(str(both))
    empty = tmp_path / "no_input.jsonl"  # Alpaca's rows without an input lose nothing
    empty.write_text(json.dumps({"instruction": "Q", "input": "", "response": "A"}) + "\n"
                     + json.dumps({"instruction": "Q", "input": None, "response": "A"}) + "\n")
    records, skipped = read_instruct_jsonl(str(empty))
    assert [r["context"] for r in records] == ["", ""] and skipped == 0
    output = tmp_path / "output.jsonl"  # Alpaca's name for the response
    output.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    with pytest.raises(UserError, match=r"output\.jsonl:1: missing field 'response' \(rename 'output' to 'response'"):
        read_instruct_jsonl(str(output))
    chat = tmp_path / "chat.jsonl"  # a chat record: named as such (it was a bare "missing field")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant",
                                                                             "content": "A"}]}) + "\n")
    with pytest.raises(UserError, match=r"chat\.jsonl:1: missing field 'instruction' \(this is a chat record, "
                                        r"'messages': a list of turns; write each example as 'instruction'"):
        read_instruct_jsonl(str(chat))
    prompt = tmp_path / "prompt.jsonl"  # generate.py's field beside an instruction was dropped silently
    prompt.write_text(json.dumps({"instruction": "Q", "prompt": "the note", "response": "A"}) + "\n")
    with pytest.raises(UserError, match=r"prompt\.jsonl:1: field 'prompt' is not read here"):
        read_instruct_jsonl(str(prompt))
    prompt.write_text(json.dumps({"prompt": "the note", "response": "A"}) + "\n")  # generate.py's input file
    with pytest.raises(UserError, match=r"prompt\.jsonl:1: field 'prompt' is not read here"):  # not "missing field"
        read_instruct_jsonl(str(prompt))

def test_a_field_spelled_another_way_is_named(tmp_path, caplog):
    """The note under another spelling (``contxt``, ``Context``) trained without it, silently: a warning names the
    file, its first line, how many lines and the field; metadata such as ``context_id`` is left alone."""
    import logging

    typo = tmp_path / "typo.jsonl"
    for stray in ("contxt", "Context"):
        typo.write_text(json.dumps({"instruction": "Q", "response": "A", "context_id": "x"}) + "\n"
                        + json.dumps({"instruction": "Q", stray: "the note", "response": "A"}) * 1 + "\n"
                        + json.dumps({"instruction": "Q", stray: "more", "response": "A"}) + "\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            records, _ = read_instruct_jsonl(str(typo))
        assert len(records) == 3 and "context_id" not in caplog.text, caplog.text
        assert (f"typo.jsonl:2: field '{stray}' is not read (did you mean 'context'?; 2 line(s) have it and no "
                f"'context'): rename it to 'context'") in caplog.text, caplog.text
    # Alpaca's 'output' beside a 'response' with other text was ignored without a word (the same text: nothing lost)
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"instruction": "Q", "response": "A", "output": "A"}) + "\n"
                    + json.dumps({"instruction": "Q", "response": "see output", "output": "lung cancer"}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records, _ = read_instruct_jsonl(str(both))
    assert [r["response"] for r in records] == ["A", "see output"]
    assert ("both.jsonl:2: field 'output' is not read (Alpaca's 'output' is our 'response'; 1 line(s) have both, "
            "with other text): only 'response' is read") in caplog.text, caplog.text


def test_an_empty_response_or_instruction_is_a_bad_line(tmp_path):
    """Trained on, an empty response teaches the model to stop at once: refused naming the line, or skipped and
    counted with skip_bad_lines."""
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"instruction": "Q", "response": "A"}) + "\n"
                 + json.dumps({"instruction": "Q", "response": " "}) + "\n"
                 + json.dumps({"instruction": "", "response": "A"}) + "\n")
    with pytest.raises(UserError, match=r"empty\.jsonl:2:.*response"):
        read_instruct_jsonl(str(p))
    records, skipped = read_instruct_jsonl(str(p), skip_bad_lines=True)
    assert len(records) == 1 and skipped == 2


def test_no_eos_is_one_error_even_when_skipping(tmp_path):
    from cancerllm_jax.data.tokenizer import load_tokenizer

    _char_tokenizer(tmp_path / "noeos", bos=True, eos=False)
    cfg = InstructDataConfig(max_seq_len=64, skip_bad_lines=True)
    with pytest.raises(UserError, match="no EOS token"):
        build_instruct_data(cfg, load_tokenizer(str(tmp_path / "noeos")), examples=[{"instruction": "q",
                                                                                   "response": "a"}])


@pytest.mark.parametrize("cfg, expect", [(InstructDataConfig(seed=-1), "data.seed"),
                                         (InstructDataConfig(max_seq_len=4), "data.max_seq_len")])
def test_bad_config_is_one_error(tok, cfg, expect):
    with pytest.raises(UserError, match=expect):
        build_instruct_data(cfg, tok, examples=[{"instruction": "q", "response": "a"}])


@pytest.mark.parametrize("record, expect", [({"instruction": "q", "response": "a", "context": 5}, "'context' must be a "
                                             "string, got integer"),
                                            ({"instruction": "q", "response": "a", "context": ["c"]}, "got array"),
                                            ({"instruction": "q"}, "'response' must be a string \\(missing\\)"),
                                            ("q", "example 0 must be a dict"),
                                            ({"instruction": "q", "response": " \n"}, "'response' is empty"),
                                            ({"instruction": "", "response": "a"}, "'instruction' is empty"),
                                            ({"id": "x7", "instruction": "q", "input": "note", "response": "a"},
                                             "x7: field 'input' is not read")])
def test_in_memory_examples_are_type_checked(tok, record, expect):
    with pytest.raises(UserError, match=expect):
        build_instruct_data(InstructDataConfig(max_seq_len=64), tok, examples=[record])
    assert build_instruct_data(InstructDataConfig(max_seq_len=64), tok, examples=[
        {"instruction": "q", "response": "a", "context": None}]).stats["examples"] == 1


def test_tokenizer_json_path_loads_its_folder(tmp_path):
    from cancerllm_jax.data.tokenizer import load_tokenizer

    _char_tokenizer(tmp_path / "tok", bos=True)
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).encode("ab", bos=True) == [1, 2, 3]
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(UserError, match="is not a tokenizer"):  # read by name: no weights file parsed as a model
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "bad.model").write_text("a\n")
    with pytest.raises(UserError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))
    if importlib.util.find_spec("mistral_common") is not None:  # tokenizer.model.v1: any file name is read
        from cancerllm_jax.data.tokenizer import mistral_v1_model_file

        assert load_tokenizer(mistral_v1_model_file()).vocab_size == 32000
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").encode("ab", bos=True) == [1, 2, 3]  # a Path
    for bad in (5, ["tok"]):  # not a file descriptor, not a crash
        with pytest.raises(UserError, match="tokenizer: expected"):
            load_tokenizer(bad)


def test_eval_truncation_is_reported(tok, caplog):
    caplog.set_level("INFO")
    long = {"instruction": "Q", "context": "word " * 200, "response": "A"}
    data = build_instruct_data(InstructDataConfig(max_seq_len=64), tok, examples=[long], eval_examples=[long, long])
    assert data.stats["eval"]["truncated_examples"] == 2
    assert "instruction eval data: 2 examples, 2 contexts truncated" in caplog.text
    caplog.clear()  # the eval batches built on their own are reported the same way
    make_eval_batches(InstructDataConfig(max_seq_len=64), tok, 2, eval_examples=[long, long, long])
    assert "instruction eval data: 3 examples, 3 contexts truncated" in caplog.text


def test_sentencepiece_decode_skips_specials_and_ids_past_its_vocabulary():
    """A model with more rows than the tokenizer has pieces (32768 vs Mistral v1's 32000) may generate such ids:
    they are dropped as HF's decode(skip_special_tokens=True) drops them, with <unk>, BOS and EOS."""
    from cancerllm_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    ids = tok.encode("pt w/ nsclc", bos=True)
    assert tok.decode(ids) == "pt w/ nsclc"
    assert tok.decode([0, *ids, 32005, 40000, -1, tok.eos_id]) == "pt w/ nsclc"


def test_the_data_digest_sees_content_and_order_that_counts_miss(tok):
    """``--resume`` compares the data's counts and digest: lines in another order (or a word swapped for one of
    the same length in tokens) keep every count but not the digest, in the training and in the eval set."""
    records = [{"instruction": "Q?", "context": f"finding {i}", "response": f"r{i}"} for i in range(4)]
    cfg = InstructDataConfig(max_seq_len=64)

    def stats(train, evals):
        return build_instruct_data(cfg, tok, examples=train, eval_examples=evals).stats

    base = stats(records, records[:2])
    moved = stats(records[::-1], records[:2])
    moved_eval = stats(records, records[1::-1])
    count_keys = [k for k in base if not k.endswith("digest") and not isinstance(base[k], dict)]
    assert [base[k] for k in count_keys] == [moved[k] for k in count_keys] == [moved_eval[k] for k in count_keys]
    assert moved["digest"] != base["digest"] and moved["eval_digest"] == base["eval_digest"]
    assert moved_eval["eval_digest"] != base["eval_digest"] and moved_eval["digest"] == base["digest"]
    assert stats(records, records[:2]) == base  # and it is deterministic
