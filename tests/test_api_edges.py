"""Edges of the front door (``cj.load`` arguments) and of the LoRA branch's precision against peft."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import cancerllm_jax as cj
from cancerllm_jax.errors import UserError

VOCAB = 60  # divides the model axes below, so the vocabulary is really sharded


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny HF Mistral folder and a PEFT adapter for it (non-zero B): ``(hf model, base folder, adapter folder,
    peft model)``."""
    import peft
    import transformers

    conf = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                      initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(conf).eval()
    base = str(tmp_path_factory.mktemp("base"))
    model.save_pretrained(base, safe_serialization=True)
    tuned = peft.get_peft_model(transformers.MistralForCausalLM.from_pretrained(base).eval(),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter = str(tmp_path_factory.mktemp("adapter"))
    tuned.save_pretrained(adapter)
    return model, base, adapter, tuned.eval()


@pytest.mark.parametrize("alias,name", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_aliases_load_an_adapter_merged(base_and_adapter, alias, name):
    """``dtype="bf16"`` (an accepted alias) with a merged adapter: the merge cast crashed on the alias."""
    _, base, adapter, _ = base_and_adapter
    ids = np.arange(12, dtype=np.int32)[None] % VOCAB
    a = cj.load(base, adapter=adapter, dtype=alias).logits(ids)
    b = cj.load(base, adapter=adapter, dtype=name).logits(ids)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,words", [
    ({"dtype": None}, ["dtype None is not supported", "bf16"]),
    ({"dtype": 3}, ["dtype 3 is not supported"]),
    ({"dtype": np.int32}, ["is not supported"]),
    ({"merge_lora": "no"}, ["merge_lora must be True or False"]),
    ({"adapter": 5}, ["adapter: expected a PEFT adapter folder, got 5"]),
    ({"adapter": ""}, ["adapter: expected a PEFT adapter folder, got ''"]),
])
def test_bad_load_arguments_are_one_clear_error(base_and_adapter, kwargs, words):
    _, base, _, _ = base_and_adapter
    with pytest.raises(UserError) as e:
        cj.load(base, **kwargs)
    for w in words:
        assert w in str(e.value)


def test_unknown_arguments_of_load_and_generate_are_user_errors(base_and_adapter):
    """transformers habits (``torch_dtype=``, ``do_sample=``) name the argument and the right one (a bare TypeError
    before); the check runs before any weight is read or anything compiles."""
    _, base, _, _ = base_and_adapter
    with pytest.raises(cj.UserError, match="unexpected argument 'torch_dtype' \\(use dtype=\\)") as e:
        cj.load(base, torch_dtype="float32")
    assert isinstance(e.value, TypeError)
    with pytest.raises(cj.UserError, match="'mergelora' \\(did you mean 'merge_lora'\\?\\)"):
        cj.load(base, mergelora=False)
    lm = cj.load(base)
    with pytest.raises(cj.UserError, match="'do_sample' \\(temperature=0.0 is greedy") as e:
        lm.generate([[5, 6]], max_new_tokens=2, do_sample=False)
    assert isinstance(e.value, TypeError) and lm._decoder is None
    with pytest.raises(cj.UserError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        lm.generate([[5, 6]], max_new_tokens=2, temprature=0.5)
    with pytest.raises(cj.UserError, match="'max_length' \\(use max_new_tokens=: the tokens generated after"):
        lm.generate([[5, 6]], max_length=5)
    with pytest.raises(cj.UserError, match="'num_beams' \\(beam search is not supported"):
        lm.generate([[5, 6]], num_beams=2)
    with pytest.raises(cj.UserError, match=r"2-D \[B, T\], one prompt per row, got shape \(3,\) \(one prompt: pass"):
        lm.generate(np.array([5, 6, 7]), max_new_tokens=2)  # was "prompt 0: expected a list of token ids"
    with pytest.raises(cj.UserError, match=r"'stop_strings' \(use stop="):
        lm.generate(["a"], stop_strings=["b"])
    # logits, the tokenizers' encode and eval.score say it too (they raised a bare TypeError)
    from cancerllm_jax.data.tokenizer import SentencePieceTokenizer

    for call, words in ((lambda: lm.logits([[5, 6]], mask=[[1, 1]]), "'mask' (use attention_mask=)"),
                        (lambda: SentencePieceTokenizer.encode(None, "a", add_bos=True), "'add_bos' (use bos=True)"),
                        (lambda: cj.eval.score(["a"], ["a"], protocl="standard"), "'protocl' (did you mean")):
        with pytest.raises(cj.UserError) as e:
            call()
        assert isinstance(e.value, TypeError) and words in str(e.value), e.value


def test_dtype_names_and_torch_dtypes():
    """A torch dtype is taken by its name (np / jnp dtypes were, torch's were refused); a name with other digits gets
    no misleading suggestion (float64 was 'did you mean float16?')."""
    from cancerllm_jax.model import resolve_dtype

    assert resolve_dtype(torch.bfloat16) == resolve_dtype("bfloat16") and resolve_dtype(torch.float16).itemsize == 2
    for name, words in (("float64", "not supported; choose"), ("flaot32", "did you mean 'float32'"),
                        ("torch.float16", "(write 'float16')"), (torch.float64, "not supported; choose")):
        with pytest.raises(cj.UserError) as e:
            resolve_dtype(name)
        assert words in str(e.value), (name, str(e.value))


def test_generation_config_settings_not_applied_are_named_at_load(base_and_adapter, tmp_path, caplog):
    """A generation_config.json that sets a logits processor (repetition_penalty, ...) or sampling makes
    transformers' generate(ids) differ from ours: the load names each such setting; EOS / BOS / pad ids and neutral
    values (repetition_penalty 1.0, do_sample false) are not named."""
    import json
    import logging
    import shutil

    _, base, _, _ = base_and_adapter
    folder = str(tmp_path / "m")
    shutil.copytree(base, folder)
    path = os.path.join(folder, "generation_config.json")
    with open(path, "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "do_sample": False,
                   "repetition_penalty": 1.0, "temperature": 0.6}, f)
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.api"):
        cj.load(folder)
    assert "which generate here does not apply" not in caplog.text
    # greedy as the file says; but sampling, transformers would take the file's temperature (and top_k / top_p)
    assert "generation_config.json sets temperature=0.6, which transformers' generate uses when it samples" \
        in caplog.text
    with open(path, "w") as f:
        json.dump({"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.1, "typical_p": 0.5}, f)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.api"):
        cj.load(folder)
    assert "when it samples" not in caplog.text  # transformers' own defaults
    assert "sets min_p=0.1, typical_p=0.5, which generate here does not apply" in caplog.text
    with open(path, "w") as f:
        json.dump({"eos_token_id": 2, "repetition_penalty": 1.5, "no_repeat_ngram_size": 3, "do_sample": True,
                   "suppress_tokens": []}, f)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.api"):
        cj.load(folder)
    assert "sets do_sample=true, repetition_penalty=1.5, no_repeat_ngram_size=3, which generate here does not " \
           "apply" in caplog.text


def test_model_path_of_the_wrong_type_is_one_clear_error():
    with pytest.raises(UserError, match="model path: expected a folder name, got None"):
        cj.load(None)


def test_unmerged_bf16_lora_is_peft_exact_per_projection(base_and_adapter):
    """A bf16 base with float32 factors: peft casts the input to float32, adds the float32 branch to the bf16 base
    output and rounds once. Computing the branch in bf16 (four roundings) matched peft in only ~half the entries."""
    import jax.numpy as jnp

    _, _, _, tuned = base_and_adapter
    layer = copy.deepcopy(tuned.base_model.model.model.layers[0].mlp.down_proj).to(torch.bfloat16)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    x = np.random.default_rng(0).standard_normal((3, 9, 48)).astype(np.float32)
    with torch.no_grad():
        ref = layer(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    from cancerllm_jax.config import LoRAConfig, ModelConfig
    from cancerllm_jax.model import create_model

    cfg = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8)
    model = create_model(cfg, LoRAConfig(rank=4, alpha=8, targets=("down",)), dtype="bfloat16")
    w = {"kernel": jnp.asarray(layer.base_layer.weight.float().detach().numpy().T, jnp.bfloat16),
         "lora_a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
         "lora_b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)}
    ours = np.asarray(model._proj(jnp.asarray(x, jnp.bfloat16), w, None, 0), np.float32)
    assert (ours == ref).mean() > 0.99, (ours == ref).mean()


@pytest.mark.parametrize("mask,words", [
    (np.ones((1, 5)), ["attention_mask", "0/1"]),
    (np.full((1, 6), 0.5), ["attention_mask", "0/1"]),  # floats are taken when 0 or 1, as transformers takes them
    (np.full((1, 6), 2), ["0/1"]),
    (np.ones((2, 6), np.int32), ["shape of input_ids (1, 6)"]),
])
def test_bad_attention_mask_is_one_clear_error(base_and_adapter, mask, words):
    _, base, _, _ = base_and_adapter
    lm = cj.load(base)
    with pytest.raises(UserError) as e:
        lm.logits(np.arange(6)[None], attention_mask=mask)
    for w in words:
        assert w in str(e.value)


def test_a_float_attention_mask_of_zeros_and_ones_is_the_integer_mask(base_and_adapter):
    """transformers takes a float 0/1 mask (``torch.ones(...)``); it was refused."""
    _, base, _, _ = base_and_adapter
    lm = cj.load(base)
    ids = np.arange(12).reshape(2, 6)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    want = lm.logits(ids, attention_mask=mask)
    np.testing.assert_array_equal(lm.logits(ids, attention_mask=mask.astype(np.float32)), want)
    np.testing.assert_array_equal(lm.logits(ids, attention_mask=torch.from_numpy(mask).double()), want)


def test_mesh_forms():
    """``"2x1"``, ``" 2 × 1 "`` and ``(2, 1)`` are one mesh; anything else is one error naming the value."""
    from cancerllm_jax.sharding import parse_mesh

    assert parse_mesh("2x1") == parse_mesh(" 2 × 1 ") == parse_mesh((2, 1)) == (2, 1)
    for bad in ("2", "2x", "0x1", "2x2x2", None, (2, 1.0), (True, 1), "-1x2"):
        with pytest.raises(UserError, match="expected DATAxMODEL"):
            parse_mesh(bad)


def test_meshes_give_the_same_logits_and_tokens(base_and_adapter):
    """``lm.logits`` (padded rows, an unmerged adapter) and greedy ``generate`` on meshes that split the batch and
    the heads: a batch of 3 over 2 data devices, 2 KV heads over 4 model devices (replicated), equal to peft."""
    _, base, adapter, tuned = base_and_adapter
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(3, 11), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = tuned(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask)).logits.numpy()
    first, tokens = None, []
    for mesh in ("1x1", "2x1", "1x2", "2x2", "1x4", "3x2"):
        lm = cj.load(base, adapter=adapter, merge_lora=False, mesh=mesh)
        out = lm.logits(ids, attention_mask=mask)
        assert float(np.abs(out - ref)[mask > 0].max()) <= 1e-4, mesh
        first = out if first is None else first
        assert float(np.abs(out - first).max()) <= 1e-5, mesh
        if mesh in ("1x1", "2x2", "3x2"):
            tokens.append(lm.generate([ids[0].tolist(), ids[2, :4].tolist()], max_new_tokens=3, eos_id=[]))
    assert tokens[0] == tokens[1] == tokens[2]


def test_a_mesh_on_a_cpu_host_gets_its_devices_or_says_how(base_and_adapter):
    """``cj.load(mesh="2x2")`` in a fresh process without XLA_FLAGS provides the CPU host devices, as the launchers
    do (it said "needs 4 devices but 1 exist"); once JAX has started it names how to provide them."""
    import subprocess
    import sys

    _, base, _, _ = base_and_adapter
    code = ("import numpy as np, jax, cancerllm_jax as cj\n{pre}"
            f"out = cj.load({base!r}, mesh='2x2').logits(np.array([[1, 2, 3]]))\n"
            "print(jax.device_count(), out.shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", code.format(pre="")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split()[0] == "4", done.stderr[-2000:]
    started = subprocess.run([sys.executable, "-c", code.format(pre="jax.numpy.ones(1).block_until_ready()\n")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode != 0 and "jax.config.update('jax_num_cpu_devices', 4)" in started.stderr
    own = subprocess.run([sys.executable, "-c", code.format(pre="jax.config.update('jax_num_cpu_devices', 8)\n")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert own.returncode == 0 and own.stdout.split()[0] == "8", own.stderr[-2000:]  # a user's count is not lowered


def test_the_package_exposes_eval_and_user_error():
    """``cj.eval.score`` (the API's scoring entry) after a bare ``import cancerllm_jax as cj``, and ``cj.UserError``;
    the import stays free of JAX."""
    import subprocess
    import sys

    code = ("import sys, cancerllm_jax as cj; assert 'jax' not in sys.modules; "
            "assert cj.eval.score(['a b'], ['a b'], protocol='standard')['avg_f1'] == 100.0; "
            "assert issubclass(cj.UserError, Exception)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs,words", [
    ({"input_ids": [[1, 2, 3], [4, 5]]}, ["input_ids", "rows of different lengths"]),
    ({"input_ids": [[1, 2], [4, 5]], "attention_mask": [[1, 1], [1]]}, ["attention_mask", "rows of different"]),
    ({"input_ids": []}, ["input_ids", "got shape (0,)"]),
])
def test_ragged_or_empty_logits_input_is_one_clear_error(base_and_adapter, kwargs, words):
    _, base, _, _ = base_and_adapter
    with pytest.raises(UserError) as e:
        cj.load(base).logits(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_logits_and_generate_take_lists_and_arrays_alike(base_and_adapter):
    """numpy int32/int64, jax, torch and lists give the same logits ([T] → [T, V]); ``generate`` takes an id array
    [B, T] as its rows (it refused one)."""
    import jax.numpy as jnp

    model, base, _, _ = base_and_adapter
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 7))
    lm = cj.load(base)
    out = lm.logits(ids.tolist())
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert out.dtype == np.float32 and out.shape == (2, 7, VOCAB) and float(np.abs(out - ref).max()) <= 1e-4
    for form in (ids, ids.astype(np.int32), jnp.asarray(ids), torch.from_numpy(ids)):
        np.testing.assert_array_equal(lm.logits(form), out)
    np.testing.assert_array_equal(lm.logits(ids[1]), out[1])
    # right-padded to a length bucket: lengths 9-16 share one compiled shape (each compiled apart) and stay exact
    compiled = lm._logits_fn._cache_size()
    long = np.random.default_rng(2).integers(0, VOCAB, size=(2, 16))
    with torch.no_grad():
        ref = model(torch.from_numpy(long)).logits.numpy()
    for t in (9, 13, 16):
        assert float(np.abs(lm.logits(long[:, :t]) - ref[:, :t]).max()) <= 1e-4
    assert lm._logits_fn._cache_size() == compiled
    expected = lm.generate(ids.tolist(), max_new_tokens=2, eos_id=[])
    assert lm.generate(ids.astype(np.int32), max_new_tokens=2, eos_id=[]) == expected
    assert lm.generate(jnp.asarray(ids), max_new_tokens=2, eos_id=[]) == expected


def test_tokenizer_argument_forms(base_and_adapter, tmp_path):
    """``tokenizer=`` a ``pathlib.Path`` (of a ``tokenizer.json``: it crashed on ``.endswith``) loads; a non-path is
    one clear error (an int was taken for an open file descriptor)."""
    import pathlib

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(tmp_path)
    _, base, _, _ = base_and_adapter
    lm = cj.load(base, tokenizer=pathlib.Path(tmp_path) / "tokenizer.json")
    assert lm.tokenizer.encode("a b", eos=True) == [3, 4, 2] and lm.tokenizer.decode([3, 4, 2]) == "a b"
    with pytest.raises(UserError, match="tokenizer: expected .* got 5"):
        cj.load(base, tokenizer=5)


def test_tokenizer_encode_and_decode_check_their_arguments(tmp_path):
    """``encode`` takes a str; ``decode`` one sequence of integer ids (list, tuple, numpy or jax array, or one id),
    dropping ids outside the vocabulary as it drops special tokens; a string, floats, booleans or a batch are one
    clear ``TypeError`` (they leaked sentencepiece's or transformers' own errors, or decoded int(1.5) as BOS)."""
    import jax.numpy as jnp
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from cancerllm_jax.data.tokenizer import load_tokenizer

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(tmp_path)
    for tok in (load_tokenizer(str(tmp_path)), load_tokenizer("mistral-v1")):
        ids = tok.encode("a b")
        text = tok.decode(ids)
        assert text.strip() == "a b"
        for same in (tuple(ids), np.array(ids, np.int64), jnp.array(ids, jnp.int32), [-1, *ids, 10 ** 6]):
            assert tok.decode(same) == text
        assert tok.decode(ids[0]) == tok.decode(ids[:1]) and tok.decode([]) == ""
        for bad, words in (("abc", "got str"), ([[3, 4]], "2-D"), ([[3, 4], [3]], "got list"), ([1.5], "float64"),
                           ([True], "booleans"), ([3, True], "booleans"), (None, "NoneType"),
                           ([3, 2**70], "not int64 ids")):
            with pytest.raises(TypeError, match=f"tokenizer.decode: ids must be one sequence.*{words}"):
                tok.decode(bad)
        for bad in (5, None, b"a b"):
            with pytest.raises(UserError, match="tokenizer.encode: text must be a str"):
                tok.encode(bad)


def test_a_model_path_that_is_an_adapter_or_inside_a_run_says_what_to_give(base_and_adapter, tmp_path):
    _, base, adapter, _ = base_and_adapter
    with pytest.raises(UserError, match="it is a PEFT adapter: give its base model as the path"):
        cj.load(adapter)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    for inner in ("checkpoints", "checkpoints/10"):
        with pytest.raises(UserError, match=f"inside the training run {tmp_path}: give the run folder"):
            cj.load(str(tmp_path / inner))


def test_a_sentencepiece_folder_without_tokenizer_json_is_read_as_trained(tmp_path):
    """A slow tokenizer's save (``tokenizer.model`` + ``tokenizer_config.json``, no ``tokenizer.json``): the .model's
    own ids (transformers 5 converts it and drops the space of " hello world", as ids of "hello world"), unless the
    folder adds tokens the .model lacks (then transformers reads it, as the converted checkpoint test shows)."""
    import json
    import shutil

    from cancerllm_jax.data.tokenizer import HFTokenizer, load_tokenizer, mistral_v1_model_file

    shutil.copy(mistral_v1_model_file(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    want = load_tokenizer("mistral-v1")
    tok = load_tokenizer(str(tmp_path))
    for text in (" hello world", "Patient:  ER+  PR-", " ", "a\n\nb"):
        assert tok.encode(text, bos=True) == want.encode(text, bos=True), text
    for name, extra in (("added_tokens.json", {"<|im_end|>": 32000}),
                        ("special_tokens_map.json", {"eos_token": {"content": "<|im_end|>"}}),
                        ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False})):
        (tmp_path / name).write_text(json.dumps(extra))  # the folder asks for more than the .model: transformers
        assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer), name
        (tmp_path / name).unlink()


def test_a_wrong_tokenizer_fails_before_the_weights_are_read_and_a_surrogate_is_a_user_error(monkeypatch, tmp_path):
    """``cj.load(path, tokenizer=WRONG)`` failed only after every weight was read (minutes at 7B); a lone surrogate
    in a text reached the tokenizer libraries' own TypeError / RuntimeError."""
    import cancerllm_jax as cj
    from cancerllm_jax import api
    from cancerllm_jax.data.tokenizer import load_tokenizer

    def no_weights(*a, **k):
        raise AssertionError("weights read before the tokenizer was checked")

    monkeypatch.setattr(api, "read_weights", no_weights)
    (tmp_path / "empty").mkdir()
    for wrong, message in ((tmp_path / "nope", "tokenizer not found"), (tmp_path / "empty", "no tokenizer.json")):
        with pytest.raises(cj.UserError, match=message):
            cj.load("tiny", tokenizer=str(wrong))
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(tmp_path / "hf")
    for tok in (load_tokenizer("mistral-v1"), load_tokenizer(str(tmp_path / "hf"))):
        with pytest.raises(cj.UserError, match=r"lone UTF-16 surrogate \('\\ud800'\) at character 3"):
            tok.encode("abc\ud800")
        with pytest.raises(cj.UserError, match="surrogate"):
            tok("abc\ud800")


def test_the_tokenizer_called_on_text_answers_as_transformers(tmp_path):
    """``lm.tokenizer(text)`` (the habit from transformers; the object was not callable) gives transformers' own
    ``input_ids`` and ``attention_mask``: the BOS where the tokenizer adds one, special-token strings as tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from cancerllm_jax.data.tokenizer import load_tokenizer

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                              eos_token="</s>")
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(str(tmp_path))
    texts = ["a b", "a </s> b", "c"]
    for text in texts:
        assert ours(text) == {k: list(v) for k, v in hf(text).items() if k in ("input_ids", "attention_mask")}
        assert ours(text, add_special_tokens=False)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"]
    assert ours(texts)["input_ids"] == hf(texts)["input_ids"] and ours("a b")["input_ids"][0] == 1
    assert not ours.adds_eos
    # a tokenizer that ends every text with its EOS (a config's add_eos_token): tokenizer(text) too; prompts not
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(tmp_path / "eos")
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "eos"), load_tokenizer(str(tmp_path / "eos"))
    assert ours.adds_eos and ours("a b")["input_ids"] == list(hf("a b")["input_ids"]) == [1, 3, 4, 2]
    assert ours(texts)["input_ids"] == hf(texts)["input_ids"]
    assert ours("a b", add_special_tokens=False)["input_ids"] == [3, 4] and ours.encode("a b", bos=True) == [1, 3, 4]
    mistral = load_tokenizer("mistral-v1")
    assert mistral("hello")["input_ids"] == mistral.encode("hello", bos=True) == [1, *mistral.encode("hello")]
    assert mistral("hello").input_ids == mistral("hello")["input_ids"]  # as BatchEncoding reads
    with pytest.raises(TypeError, match="takes add_special_tokens only, not padding, return_tensors"):
        mistral(["a", "b c"], padding=True, return_tensors="np")
