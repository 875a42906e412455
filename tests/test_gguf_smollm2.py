"""SmolLM2-135M-Instruct real weights (GGUF → fp32 HF folder): our forward against transformers, fp32."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import cancerllm_jax as cj
from cancerllm_jax.checkpoint.gguf import DEFAULT_OUT, default_gguf_path, import_gguf, is_complete
from cancerllm_jax.errors import UserError

PROMPTS = (
    "The patient is a 58-year-old man with stage IIIA nsclc, EGFR negative, s/p lobectomy.",
    "Pathology: invasive ductal carcinoma, grade 2, ER+/PR+, HER2-, margins negative, pT2N1a.",
    "Plan: concurrent chemoradiation, 60 Gy in 30 fx, weekly carboplatin and paclitaxel.",
)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """The imported folder: the user's cache when already complete, else a fresh import into a temp folder."""
    try:
        default_gguf_path()
    except UserError as e:
        pytest.skip(str(e))
    cached = os.path.expanduser(DEFAULT_OUT)
    if is_complete(cached):
        return cached
    return import_gguf(out_dir=str(tmp_path_factory.mktemp("smollm2") / "model"))


@pytest.fixture(scope="module")
def both(smollm2_dir):
    """(ours, transformers model, transformers tokenizer) on the same fp32 weights, loaded once."""
    lm = cj.load(smollm2_dir, dtype="float32")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    return lm, ref_model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
def test_smollm2_matches_transformers(both):
    lm, ref_model, tok = both
    assert lm.cfg.model_type == "llama" and lm.cfg.num_layers == 30 and lm.cfg.tie_embeddings
    assert lm.cfg.rope_theta == 100000.0 and lm.cfg.vocab_size == 49152
    rows = [tok(text)["input_ids"] for text in PROMPTS]
    for text, ids in zip(PROMPTS, rows, strict=True):
        assert len(ids) > 10 and lm.tokenizer.encode(text) == ids, text
    # one right-padded batch: one compile; causal attention keeps the real positions independent of the padding
    width = max(map(len, rows))
    batch = np.array([ids + [0] * (width - len(ids)) for ids in rows], np.int32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(batch.astype(np.int64))).logits.numpy()
    ours = lm.logits(batch)
    for text, ids, r, o in zip(PROMPTS, rows, ref, ours, strict=True):
        r, o = r[:len(ids)], o[:len(ids)]
        diff = float(np.abs(o - r).max())
        assert diff <= 1e-3, f"max|dlogit| {diff:.2e} on {text!r}"
        assert (o.argmax(-1) == r.argmax(-1)).all(), f"argmax differs on {text!r}"


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(both):
    """Ragged prompts in one batch give transformers' greedy tokens, one prompt at a time."""
    lm, ref_model, tok = both
    rows = [tok(text)["input_ids"] for text in PROMPTS[:2]]
    got = lm.generate(rows, max_new_tokens=8, temperature=0.0)
    for ids, g in zip(rows, got, strict=True):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=ref_model.config.eos_token_id, pad_token_id=0)[0, len(ids):]
        assert g == ref.tolist()
    # string prompts are framed as tokenizer(text) frames them (SmolLM2's adds no BOS): the same text comes out
    texts = lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.0, eos_id=ref_model.config.eos_token_id)
    for ids, g, text in zip(rows, got, texts, strict=True):
        assert text == lm.tokenizer.decode([t for t in g if t != ref_model.config.eos_token_id])


@pytest.mark.slow
def test_import_reuses_a_complete_folder(smollm2_dir, tmp_path):
    assert import_gguf(out_dir=smollm2_dir) == os.path.abspath(smollm2_dir)  # no rework: returns at once
    with pytest.raises(UserError, match="not found"):
        import_gguf(str(tmp_path / "nope.gguf"), out_dir=str(tmp_path / "x"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a finished import"):
        import_gguf(out_dir=str(tmp_path / "busy"))


def test_a_finished_import_is_reused_only_for_the_gguf_it_was_made_from(tmp_path, monkeypatch):
    """``import_gguf(OTHER.gguf, out_dir=DIR)`` on a finished import of another GGUF returned DIR (the user got the
    other model, exit 0); the import records its source (``gguf_source.json``) and is reused only for it."""
    import json

    from cancerllm_jax.checkpoint import gguf

    monkeypatch.setattr(gguf, "_load_gguf", lambda path: pytest.fail("a reusable import was redone"))
    mine, other = tmp_path / "mine.gguf", tmp_path / "other.gguf"
    mine.write_bytes(b"GGUF mine")
    other.write_bytes(b"GGUF other")
    done = tmp_path / "done"
    done.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (done / name).write_text("{}")
    for overwrite in (False, True):  # a model folder without the record is no import: never replaced
        with pytest.raises(UserError, match=r"not a finished import \(it lacks gguf_source.json\): it is never"):
            import_gguf(str(mine), out_dir=str(done), overwrite=overwrite)
    (done / gguf.SOURCE_FILE).write_text(json.dumps(gguf.gguf_fingerprint(str(mine))))
    assert import_gguf(str(mine), out_dir=str(done)) == str(done)
    with pytest.raises(UserError, match=r"holds an import of another GGUF \(mine.gguf\), not .*other.gguf"):
        import_gguf(str(other), out_dir=str(done))


def test_overwrite_never_replaces_a_folder_that_is_no_import(tmp_path, monkeypatch):
    """``--overwrite`` on a folder of other files deleted them (the error had said to pass it)."""
    from cancerllm_jax.checkpoint import gguf

    monkeypatch.setattr(gguf, "_load_gguf", lambda path: pytest.fail("the GGUF was read before --out was checked"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "weights.bin").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"not a finished import \(it lacks config.json.*give a new --out"):
            import_gguf(str(tmp_path / "m.gguf"), out_dir=str(tmp_path / "models"), overwrite=overwrite)
    assert (tmp_path / "models" / "other" / "weights.bin").read_text() == "precious"
    # the package's own cache folder holding an import made before imports recorded their GGUF: imported again
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in gguf._REQUIRED:
        (cache / name).write_text("{}")
    monkeypatch.setattr(gguf, "DEFAULT_OUT", str(cache))
    monkeypatch.setattr(gguf, "_load_gguf", lambda path: (_ for _ in ()).throw(RuntimeError("imported again")))
    with pytest.raises(RuntimeError, match="imported again"):
        import_gguf(str(tmp_path / "m.gguf"))


def test_an_out_path_that_is_a_file_fails_before_the_import(tmp_path, monkeypatch):
    from cancerllm_jax.checkpoint import gguf

    monkeypatch.setattr(gguf, "_load_gguf", lambda path: pytest.fail("the GGUF was read before --out was checked"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "afile").write_text("user data")
    with pytest.raises(UserError, match="not a folder"):
        import_gguf(str(tmp_path / "m.gguf"), out_dir=str(tmp_path / "afile"), overwrite=True)
    assert (tmp_path / "afile").read_text() == "user data"


@pytest.mark.parametrize("blob", [b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\x00" * 5, b"not a gguf" * 50])
def test_a_truncated_or_foreign_gguf_is_one_clear_error(tmp_path, blob):
    """A download cut short (gguf's reader raises struct.error on it) or another file: one error naming it."""
    (tmp_path / "m.gguf").write_bytes(blob)
    with pytest.raises(UserError, match="m.gguf: transformers could not read this GGUF"):
        import_gguf(str(tmp_path / "m.gguf"), out_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
