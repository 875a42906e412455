"""Damaged or hostile JSON files (bad UTF-8, invalid JSON, nesting 100k deep, a 5000-digit integer, not an object) are
one ``UserError`` naming the file (and its line where known), never a crash reported as a bug nor a file ignored
silently; a prediction file whose own gold answers differ from the gold file's is scored with a warning."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from cancerllm_jax.checkpoint.orbax_io import META_FILE, read_meta
from cancerllm_jax.checkpoint.peft import adapter_base_name
from cancerllm_jax.config import read_hf_config
from cancerllm_jax.data.tokenizer import load_tokenizer, mistral_v1_model_file
from cancerllm_jax.errors import UserError
from cancerllm_jax.eval import score_file
from cancerllm_jax.train.run_io import RUN_FILE, read_run_meta

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
HUGE_INT = '{"a": ' + "1" * 5000 + "}"  # ValueError: exceeds the limit (4300 digits) for integer string conversion


@pytest.mark.parametrize("name, reader", [(RUN_FILE, read_run_meta), (META_FILE, read_meta)])
def test_run_and_checkpoint_meta_not_utf8(tmp_path, name, reader):
    good = json.dumps({"format": "x", "model": {}}, indent=2).encode()
    (tmp_path / name).write_bytes(good.replace(b'"model"', b'"mo\xffdel"'))
    with pytest.raises(UserError, match=rf"{name}:3: not valid UTF-8 \(byte 0xff\).*damaged"):
        reader(str(tmp_path))


@pytest.mark.parametrize("name, reader", [(RUN_FILE, read_run_meta), (META_FILE, read_meta)])
@pytest.mark.parametrize("text, problem", [(DEEP, "nested too deeply"), (HUGE_INT, "Exceeds the limit")])
def test_run_and_checkpoint_meta_pathological_json(tmp_path, name, reader, text, problem):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=rf"{name}: invalid JSON \({problem}.*damaged or unreadable"):
        reader(str(tmp_path))


def _sp_folder(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(mistral_v1_model_file(), folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"])
@pytest.mark.parametrize("content, problem", [
    (b'{"add_bos_token": false,\n broken}', r":2: invalid JSON \(Expecting property name"),
    (b'{"bos_token": "\xff"}', r":1: not valid UTF-8 \(byte 0xff\)"),
    (b'["not", "an", "object"]', r": expected a JSON object, got array"),
])
def test_damaged_tokenizer_side_file_is_not_ignored(tmp_path, name, content, problem):
    folder = _sp_folder(tmp_path)
    assert load_tokenizer(str(folder)).vocab_size == 32000  # an absent file is still absent: {}
    (folder / name).write_bytes(content)
    with pytest.raises(UserError, match=rf"tok/{name}{problem}"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("text, problem", [(DEEP, "nested too deeply"), (HUGE_INT, "Exceeds the limit")])
def test_score_file_pathological_line(tmp_path, text, problem):
    gold, pred = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    gold.write_text('{"id": "a", "response": "x"}\n{"id": "b", "response": "y"}\n')
    pred.write_text('{"id": "a", "prediction": "x"}\n' + text + "\n")
    with pytest.raises(UserError, match=rf"p\.jsonl:2: not valid JSON \({problem}"):
        score_file(str(gold), str(pred))


def test_hf_config_nested_too_deeply(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": ' + DEEP + "}")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON \(nested too deeply\)"):
        read_hf_config(str(tmp_path))


def test_hf_files_with_a_key_given_twice_read_as_transformers_reads_them(tmp_path):
    """A Hugging Face JSON file that repeats a key is read as ``json.load`` reads it (the last value), as
    transformers and peft read it; a damaged safetensors index is one error naming it (was a raw UnicodeDecodeError)."""
    from cancerllm_jax.checkpoint.hf import safetensors_files
    from cancerllm_jax.config import read_json_file

    (tmp_path / "config.json").write_text('{"model_type": "mistral", "torch_dtype": "float16", '
                                          '"torch_dtype": "bfloat16"}')
    assert read_json_file(str(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": {}}\xff')
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json"):
        safetensors_files(str(tmp_path))


@pytest.mark.parametrize("text, problem", [(DEEP, "nested too deeply"), (HUGE_INT, "Exceeds the limit")])
def test_adapter_config_pathological_json(tmp_path, text, problem):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(UserError, match=rf"adapter_config\.json: not valid JSON \({problem}"):
        adapter_base_name(str(tmp_path))


@pytest.mark.parametrize("ids", [True, False])
def test_prediction_gold_other_than_the_gold_file_is_a_warning(tmp_path, caplog, ids):
    secret = "metastatic adenocarcinoma of the left breast"
    gold, pred = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    answers = ["lung", "breast", "colon"]
    pred_gold = ["lung", secret, "rectum"]  # lines 2 and 3 carry another answer than the gold file's
    key = (lambda i: {"id": f"n{i}"}) if ids else (lambda i: {})
    gold.write_text("".join(json.dumps({**key(i), "response": a}) + "\n" for i, a in enumerate(answers)))
    pred.write_text("".join(json.dumps({**key(i), "gold": g, "prediction": a}) + "\n"
                            for i, (g, a) in enumerate(zip(pred_gold, answers))))
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.eval.protocol"):
        result = score_file(str(gold), str(pred))
    warned = [r.getMessage() for r in caplog.records if "carry a 'gold' answer" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "p.jsonl: 2 of 3 prediction lines" in warned[0] and "(first: line 2" in warned[0]
    assert ("id 'n1'" in warned[0]) == ids
    assert secret not in caplog.text and "rectum" not in caplog.text  # no clinical text in logs
    plain = tmp_path / "plain.jsonl"  # scores unchanged: the gold file's answers are scored
    plain.write_text("".join(json.dumps({**key(i), "prediction": a}) + "\n" for i, a in enumerate(answers)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.eval.protocol"):
        assert score_file(str(gold), str(plain)) == result
    assert "carry a 'gold' answer" not in caplog.text
