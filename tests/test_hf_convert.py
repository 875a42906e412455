"""HF ⇄ converted checkpoint: bit-identical round trips, transformers loads our exports, bad inputs fail clearly."""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

import cancerllm_jax as cj
from cancerllm_jax.checkpoint.hf import read_hf, write_hf
from cancerllm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 61


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert = _load_tool("convert_checkpoint")


def make_model(dtype=torch.float32, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                     max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=tied)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor in a folder's safetensors file(s), as raw bytes-comparable numpy arrays."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                for k in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                    out[k] = f.get_tensor(k)
    return out


def run_cli(*args: str) -> int:
    """The CLI in-process; returns its exit code (0 when main returns normally)."""
    try:
        return convert.main(list(args))
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory):
    model = make_model(torch.float32)
    folder = str(tmp_path_factory.mktemp("hf_fp32"))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def hf_bf16_tied(tmp_path_factory):
    model = make_model(torch.bfloat16, tied=True, seed=1)
    folder = str(tmp_path_factory.mktemp("hf_bf16"))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("which", ["hf_fp32", "hf_bf16_tied"])
def test_roundtrip_is_bit_identical(which, request, tmp_path):
    _, folder = request.getfixturevalue(which)
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert run_cli("from-hf", folder, ckpt) == 0
    assert run_cli("to-hf", ckpt, back) == 0
    src, out = tensors(folder), tensors(back)
    assert set(out) == set(src)
    for k, v in src.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert out[k].tobytes() == v.tobytes(), k
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["dtype"] == str(src["model.embed_tokens.weight"].dtype)


def test_export_loads_in_transformers_with_same_logits(hf_fp32, tmp_path):
    model, folder = hf_fp32
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert run_cli("from-hf", folder, ckpt) == 0
    assert run_cli("to-hf", ckpt, back) == 0
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 14))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
        got = reloaded(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_array_equal(got, ref)
    ours = cj.load(ckpt, dtype="float32").logits(ids.astype(np.int32))
    assert float(np.abs(ours - ref).max()) <= 1e-4
    umask = os.umask(0)
    os.umask(umask)  # the user's usual file mode (safetensors' save_file alone writes 0600)
    assert {oct(os.stat(p).st_mode & 0o777) for p in glob.glob(f"{back}/*")} == {oct(0o666 & ~umask)}


def test_bf16_cast_on_import(hf_fp32, tmp_path):
    _, folder = hf_fp32
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert run_cli("from-hf", folder, ckpt, "--dtype", "bfloat16") == 0
    assert run_cli("to-hf", ckpt, back) == 0
    out, src = tensors(back), tensors(folder)
    assert str(out["model.embed_tokens.weight"].dtype) == "bfloat16"
    for k, v in src.items():
        np.testing.assert_array_equal(out[k], v.astype(out[k].dtype), err_msg=k)


def test_sharded_export_loads_and_reads_back(hf_fp32, tmp_path):
    model, folder = hf_fp32
    cfg, params = read_hf(folder)
    out = str(tmp_path / "sharded")
    files = write_hf(out, cfg, params, shard_bytes=20_000)
    assert len(files) > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    for name in files:  # streamed shards read as safetensors' own: metadata, and every byte accounted for
        with safe_open(os.path.join(out, name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
        from safetensors.numpy import load_file

        assert load_file(os.path.join(out, name))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(10).unsqueeze(0) % VOCAB
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())
    cfg2, params2 = read_hf(out)
    assert cfg2 == cfg
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_cli_runs_from_repo_root(hf_fp32, tmp_path):
    _, folder = hf_fp32
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "from-hf", folder, str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "from-hf", folder, str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr


# -- bad inputs: one clear error each, non-zero exit ------------------------------------------------------------

def _copy(folder: str, dst: str) -> str:
    import shutil

    shutil.copytree(folder, dst)
    return dst


def _edit_tensors(folder: str, fn) -> None:
    path = os.path.join(folder, "model.safetensors")
    data = tensors(folder)
    fn(data)
    save_file(data, path, metadata={"format": "pt"})


def _bad_missing(src, d):
    return os.path.join(d, "does-not-exist")


def _bad_model_type(src, d):
    d = _copy(src, os.path.join(d, "m"))
    path = os.path.join(d, "config.json")
    with open(path, encoding="utf-8") as f:
        conf = json.load(f)
    conf["model_type"] = "gpt2"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(conf, f)
    return d


def _bad_shape(src, d):
    d = _copy(src, os.path.join(d, "m"))
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight", np.zeros((3, 32), np.float32)))
    return d


def _bad_corrupt(src, d):
    d = _copy(src, os.path.join(d, "m"))
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage, not a safetensors header" * 10)
    return d


def _bad_truncated(src, d):
    d = _copy(src, os.path.join(d, "m"))
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return d


def _bad_missing_tensor(src, d):
    d = _copy(src, os.path.join(d, "m"))
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return d


def _bad_extra_tensor(src, d):
    d = _copy(src, os.path.join(d, "m"))
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.7.self_attn.q_proj.weight", np.zeros((32, 32), np.float32)))
    return d


def _bad_pickle_only(src, d):
    d = os.path.join(d, "m")
    os.makedirs(d)
    import shutil

    shutil.copy(os.path.join(src, "config.json"), d)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, os.path.join(d, "pytorch_model.bin"))
    return d


BAD = {  # case -> (builder, words the message must contain)
    "missing folder": (_bad_missing, "not found"),
    "unsupported model_type": (_bad_model_type, "gpt2"),
    "wrong tensor shape": (_bad_shape, "model.safetensors: tensor model.layers.1.self_attn.k_proj.weight"),
    "corrupt safetensors": (_bad_corrupt, "safetensors"),
    "truncated safetensors": (_bad_truncated, "model.safetensors"),
    "missing tensor": (_bad_missing_tensor, "model.layers.1.mlp.up_proj.weight"),
    "unexpected tensor": (_bad_extra_tensor, "model.layers.7"),
    "pickle-only folder": (_bad_pickle_only, "pickle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_clear_error(case, hf_fp32, tmp_path, capsys):
    build, words = BAD[case]
    src = build(hf_fp32[1], str(tmp_path))
    with pytest.raises(UserError, match=None) as err:
        convert.from_hf(src, str(tmp_path / "out"))
    assert words in str(err.value), str(err.value)
    capsys.readouterr()
    assert run_cli("from-hf", src, str(tmp_path / "out2")) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error:") and len(stderr.splitlines()) == 1 and words in stderr, stderr
    assert not os.path.exists(tmp_path / "out2")


def test_non_empty_out_needs_overwrite(hf_fp32, tmp_path, capsys):
    _, folder = hf_fp32
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run_cli("from-hf", folder, str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert run_cli("to-hf", folder, str(out)) == 2
    assert run_cli("to-hf", folder, str(out), "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert not leftovers, leftovers


def test_peft_adapter_without_lora_is_an_error(hf_fp32, tmp_path, capsys):
    assert run_cli("to-hf", hf_fp32[1], str(tmp_path / "a"), "--peft-adapter") == 2
    assert "LoRA" in capsys.readouterr().err


def _tiny_llama(folder, **kw) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, initializer_range=0.1, **kw)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return model


def _same_logits_as_transformers(folder, ids) -> float:
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(
            torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    return float(np.abs(cj.load(folder).logits(ids) - ref).max())


def test_tied_config_with_a_trained_head_or_only_a_head_loads_as_transformers(tmp_path):
    """``tie_word_embeddings`` with a stored ``lm_head.weight`` that differs from the embeddings (a fine-tune that
    untied the head): transformers uses the stored head, and so do we (untied, also on export); with the head
    stored alone, the embeddings are tied to it."""
    ids = (np.arange(24, dtype=np.int32)[None] * 5) % 97
    trained = str(tmp_path / "trained")
    _tiny_llama(trained, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    _edit_tensors(trained, lambda t: t.update(
        {"lm_head.weight": rng.standard_normal(t["model.embed_tokens.weight"].shape).astype(np.float32)}))
    assert _same_logits_as_transformers(trained, ids) <= 1e-4
    cfg, params = read_hf(trained)
    assert not cfg.tie_embeddings and "lm_head" in params
    out = str(tmp_path / "out")
    write_hf(out, cfg, params)
    assert _same_logits_as_transformers(out, ids) <= 1e-4
    head_only = str(tmp_path / "head_only")
    _tiny_llama(head_only, tie_word_embeddings=True)
    _edit_tensors(head_only, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    assert _same_logits_as_transformers(head_only, ids) <= 1e-4
    same = str(tmp_path / "copy")  # a stored copy of the tied head changes nothing
    _tiny_llama(same, tie_word_embeddings=True)
    _edit_tensors(same, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert read_hf(same)[0].tie_embeddings


@pytest.mark.parametrize("kinds, window", [(["sliding_attention"] * 2, 3), (["full_attention"] * 2, None),
                                           (["full_attention", "sliding_attention"], "error")])
def test_mistral_layer_types(tmp_path, kinds, window):
    """transformers loads a Mistral config with ``layer_types`` as Ministral (a window only on 'sliding_attention'
    layers): all-sliding and all-full are read as such (same logits); a mix is refused, naming the field."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                     initializer_range=0.1)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "layer_types": kinds}))
    if window == "error":
        with pytest.raises(UserError, match="layer_types"):
            cj.load(str(tmp_path))
        return
    assert cj.load(str(tmp_path)).cfg.sliding_window == window
    ids = (np.arange(12, dtype=np.int32)[None] * 7) % 97
    assert _same_logits_as_transformers(str(tmp_path), ids) <= 1e-4


def test_an_eos_only_in_the_generation_config_is_exported(tmp_path):
    src = str(tmp_path / "src")
    _tiny_llama(src, eos_token_id=None)
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    cfg, params = read_hf(src)
    assert cfg.eos_token_ids == (7,)
    write_hf(str(tmp_path / "out"), cfg, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 7


def test_to_hf_keeps_the_generation_settings_of_a_folder_without_tokenizer_files(tmp_path):
    """``generation_config.json``'s sampling settings survive ``to-hf`` (directly and through ``from-hf``) when the
    source has no tokenizer files (they were copied only with those: do_sample, temperature and top_p were lost)."""
    src = str(tmp_path / "src")
    _tiny_llama(src)
    gen = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(gen))
    assert convert.main(["from-hf", src, str(tmp_path / "ckpt")]) == 0
    for source, out in ((src, "direct"), (str(tmp_path / "ckpt"), "through_ckpt")):
        assert convert.main(["to-hf", source, str(tmp_path / out)]) == 0
        got = json.loads((tmp_path / out / "generation_config.json").read_text())
        assert {k: got[k] for k in gen} == gen, got


def test_to_hf_keeps_the_config_keys_the_model_does_not_read(tmp_path):
    """attention_dropout, initializer_range, use_cache and Llama's pretraining_tp come back from the source's
    config.json (directly, through from-hf, and from a run on it): they were reset to constants (0.0, 0.02, True,
    1), and a user fine-tuning the export with transformers lost the attention dropout."""
    src = str(tmp_path / "src")
    _tiny_llama(src, attention_dropout=0.1, use_cache=False, pretraining_tp=2)
    conf = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**conf, "initializer_range": 0.05}))
    keys = ("attention_dropout", "initializer_range", "use_cache", "pretraining_tp")
    want = {k: transformers.AutoConfig.from_pretrained(src).to_dict()[k] for k in keys}
    assert want == {"attention_dropout": 0.1, "initializer_range": 0.05, "use_cache": False, "pretraining_tp": 2}
    assert convert.main(["from-hf", src, str(tmp_path / "ckpt")]) == 0
    for source, out in ((src, "direct"), (str(tmp_path / "ckpt"), "through_ckpt")):
        assert convert.main(["to-hf", source, str(tmp_path / out)]) == 0
        got = transformers.AutoConfig.from_pretrained(str(tmp_path / out)).to_dict()
        assert {k: got[k] for k in keys} == want, out


def test_to_hf_names_the_source_config_keys_it_does_not_carry(tmp_path, caplog, capsys):
    """Label names come back; any other key the model here does not read is dropped and named (carried, keys such
    as attention_chunk_size made transformers' generate on the export differ); non-causal or chunked attention
    is refused on import."""
    src = str(tmp_path / "src")
    _tiny_llama(src)
    conf = json.loads((tmp_path / "src" / "config.json").read_text())
    kept = {"id2label": {"0": "A", "1": "B"}, "label2id": {"A": 0, "B": 1}}
    (tmp_path / "src" / "config.json").write_text(json.dumps({**conf, **kept, "my_note": "x", "kv_sharing_modes": [1],
                                                              "auto_map": {"AutoModel": "x.Y"}}))
    assert convert.main(["from-hf", src, str(tmp_path / "ckpt")]) == 0
    for source, out in ((src, "direct"), (str(tmp_path / "ckpt"), "through_ckpt")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert convert.main(["to-hf", source, str(tmp_path / out)]) == 0
        got = json.loads((tmp_path / out / "config.json").read_text())
        assert {k: got.get(k) for k in kept} == kept and not {"my_note", "kv_sharing_modes", "auto_map"} & set(got)
        assert "not carried to the export" in caplog.text and "kv_sharing_modes, my_note" in caplog.text, out
    for key, value, needle in (("is_causal", False, "is_causal=false"), ("attention_chunk_size", 4, "chunked")):
        (tmp_path / "src" / "config.json").write_text(json.dumps({**conf, key: value}))
        with pytest.raises(SystemExit) as e:
            convert.main(["to-hf", src, str(tmp_path / f"bad_{key}")])
        assert e.value.code == 2 and needle in capsys.readouterr().err

def test_an_output_folder_that_holds_the_source_is_refused_even_with_overwrite(tmp_path, capsys):
    """``--overwrite`` replaces OUT: an OUT that holds the source (or a run's base) would delete it."""
    src = str(tmp_path / "models" / "src")
    _tiny_llama(src)
    adapter = str(tmp_path / "adapters" / "a")
    os.makedirs(adapter)
    for argv in (["from-hf", src, str(tmp_path / "models"), "--overwrite"],
                 ["from-hf", src, str(tmp_path / "adapters"), "--peft-adapter", adapter, "--overwrite"],
                 ["to-hf", src, str(tmp_path / "models"), "--overwrite"], ["to-hf", src, src, "--overwrite"]):
        with pytest.raises(SystemExit) as e:
            convert.main(argv)
        assert e.value.code == 2 and "the output folder must not be" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(src, "config.json")) and os.path.isdir(adapter)


def test_overwriting_a_folder_inside_the_source_is_refused(tmp_path, capsys):
    """``to-hf CKPT CKPT/params --overwrite`` replaced the checkpoint's own weights with the export (the checkpoint
    no longer loaded); a folder inside the input is never replaced. A new folder inside it is fine."""
    src, ckpt = str(tmp_path / "src"), str(tmp_path / "ckpt")
    _tiny_llama(src)
    os.makedirs(os.path.join(src, "old"))
    open(os.path.join(src, "old", "keep.txt"), "w").close()
    assert convert.main(["from-hf", src, ckpt]) == 0
    os.symlink(ckpt, str(tmp_path / "link"))  # the same folder through a link
    for argv in (["to-hf", ckpt, os.path.join(ckpt, "params"), "--overwrite"],
                 ["to-hf", ckpt, str(tmp_path / "link" / "params"), "--overwrite"],
                 ["from-hf", src, os.path.join(src, "old"), "--overwrite"]):
        with pytest.raises(SystemExit) as e:
            convert.main(argv)
        assert e.value.code == 2 and "would replace a folder inside the input" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(src, "old", "keep.txt"))
    cj.load(ckpt)  # its params are intact
    assert convert.main(["to-hf", ckpt, os.path.join(ckpt, "export")]) == 0


def test_a_stale_index_beside_model_safetensors_is_ignored_as_transformers_does(tmp_path):
    """transformers' ``save_pretrained`` of a small model into a folder that held a sharded one removes the shards
    but leaves ``model.safetensors.index.json``; transformers reads ``model.safetensors`` first, and so do we."""
    folder = str(tmp_path / "m")
    _tiny_llama(folder).save_pretrained(folder, max_shard_size="20KB")
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(os.listdir(folder))
    ids = (np.arange(12, dtype=np.int32)[None] * 5) % 97
    assert _same_logits_as_transformers(folder, ids) <= 1e-4
    # said once, though the conversion of a tied model lists the folder's tensors twice (to read them, and to see
    # whether it stores the tied head)
    folder = str(tmp_path / "tied")
    _tiny_llama(folder, tie_word_embeddings=True).save_pretrained(folder, max_shard_size="20KB")
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(os.listdir(folder))
    p = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "from-hf", folder, str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("has both model.safetensors and model.safetensors.index.json") == 1, p.stderr


def test_an_output_path_that_is_a_file_is_one_clear_error(hf_fp32, tmp_path):
    cfg, params = read_hf(hf_fp32[1])
    (tmp_path / "f").write_text("user data")
    with pytest.raises(UserError, match="is not a folder"):
        write_hf(str(tmp_path / "f"), cfg, params, overwrite=True)
    assert (tmp_path / "f").read_text() == "user data"


def test_a_sentencepiece_tokenizer_keeps_its_added_tokens(tmp_path):
    """A SentencePiece tokenizer folder (``tokenizer.model``) with tokens added in ``added_tokens.json``, as older
    transformers saved them: the converted checkpoint and its export keep them (transformers reads the file)."""
    import shutil

    from cancerllm_jax.data.tokenizer import mistral_v1_model_file

    src = str(tmp_path / "src")
    _tiny_llama(src)
    shutil.copy(mistral_v1_model_file(), os.path.join(src, "tokenizer.model"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "src" / "added_tokens.json").write_text(json.dumps({"<pad>": 32000, "<|im_end|>": 32001}))
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert run_cli("from-hf", src, ckpt) == 0 and run_cli("to-hf", ckpt, back) == 0
    for folder in (ckpt, back):
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert len(tok) == 32002 and tok.convert_tokens_to_ids("<|im_end|>") == 32001


def test_attention_dropout_is_read_with_a_warning(caplog):
    """Training never drops attention probabilities: a config that asks for it is read, with a warning."""
    from cancerllm_jax.config import from_hf_config

    hf = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    with caplog.at_level("WARNING"):
        from_hf_config({**hf, "attention_dropout": 0.0})
        assert not caplog.records
        from_hf_config({**hf, "attention_dropout": 0.1}, "x/config.json")
    assert "x/config.json: attention_dropout 0.1 is not applied" in caplog.text


def test_custom_code_in_auto_map_is_not_run_and_says_so(caplog):
    """A config.json naming custom code (auto_map) is read as the standard model, as transformers reads it without
    trust_remote_code, and the warning says the code is not run."""
    from cancerllm_jax.config import from_hf_config

    hf = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    with caplog.at_level("WARNING"):
        plain = from_hf_config(hf)
        assert not caplog.records
        custom = from_hf_config({**hf, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, "x/config.json")
    assert custom == plain
    assert "x/config.json: auto_map names custom model code; it is never run here" in caplog.text


def test_an_output_folder_that_holds_the_working_directory_is_refused(hf_fp32, tmp_path, capsys, monkeypatch):
    """``to-hf SRC . --overwrite`` replaced the working directory whole (the user's files in it were deleted),
    then failed on the vanished directory with exit 2."""
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("user data")
    monkeypatch.chdir(work / "src")
    for out in (".", ".."):
        with pytest.raises(SystemExit) as e:
            convert.main(["to-hf", hf_fp32[1], out, "--overwrite"])
        assert e.value.code == 2 and "the output folder must not be" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "user data" and (work / "src").is_dir()


def test_layers_stored_in_different_dtypes_are_read_without_rounding(hf_fp32, tmp_path):
    """One tensor kind stored float16 in layer 0 and float32 in layer 1 was stacked as float16 (layer 1 rounded)."""
    d = _copy(hf_fp32[1], str(tmp_path / "m"))
    key = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(d, lambda t: t.__setitem__(key, t[key].astype(np.float16)))
    src = tensors(d)
    _, params = read_hf(d)
    q = params["layers"]["q"]["kernel"]
    assert q.dtype == np.float32
    assert np.array_equal(q[1].T, src["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(q[0].T, src[key].astype(np.float32))


def _leaves(tree: dict) -> list:
    return [x for v in tree.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


def test_float64_weights_are_read_as_float32_and_said(hf_fp32, tmp_path, caplog):
    """JAX computes in at most 32 bits: float64 files are read as float32 with a warning (a converted checkpoint
    said float64 and its to-hf export came back float32 without a word)."""
    d = _copy(hf_fp32[1], str(tmp_path / "m"))
    _edit_tensors(d, lambda t: t.update({k: v.astype(np.float64) for k, v in t.items()}))
    with caplog.at_level("WARNING"):
        _, params = read_hf(d)
    assert {a.dtype for a in _leaves(params)} == {np.dtype(np.float32)}
    assert "float64 tensor(s) read as float32" in caplog.text
    src = tensors(d)
    assert np.array_equal(params["embed"], src["model.embed_tokens.weight"].astype(np.float32))


def test_an_index_that_names_a_file_outside_the_folder_is_refused(hf_fp32, tmp_path):
    d = str(tmp_path / "m")
    os.makedirs(d)
    import shutil

    shutil.copy(os.path.join(hf_fp32[1], "config.json"), d)
    shutil.copy(os.path.join(hf_fp32[1], "model.safetensors"), str(tmp_path / "outside.safetensors"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"weight_map": {k: "../outside.safetensors" for k in tensors(hf_fp32[1])}}, f)
    with pytest.raises(UserError, match="outside"):
        read_hf(d)


def test_a_run_tuned_on_a_run_exports_its_models_config_keys(tmp_path):
    """Only a run's direct base was looked at: a run tuned on a run found no config.json and its export lost the
    model's carried keys and generation settings (and --overwrite's guard did not cover the model's folder)."""
    from cancerllm_jax.train import run_io

    src = str(tmp_path / "hf")
    _tiny_llama(src, attention_dropout=0.1)
    first, second = str(tmp_path / "run1"), str(tmp_path / "run2")
    for run, base in ((first, src), (second, first)):
        os.makedirs(run)
        run_io.write_json_atomic(os.path.join(run, run_io.RUN_FILE),
                                 {"format": run_io.FORMAT, "base": {"kind": "path", "path": base}})
    assert convert._source_dirs(second) == [second, first, src]
    assert convert._source_hf_config(convert._source_dirs(second))["attention_dropout"] == 0.1


def test_config_paths_are_made_absolute_as_the_os_opens_them(tmp_path, monkeypatch):
    """Run paths are recorded absolute, joined to the current folder without normalising ("link/../x" is the file
    the OS opens through the link); presets and tokenizer names stay names; a neutral is_causal / chunk size
    dropped on export is not reported."""
    from cancerllm_jax.config import to_hf_config
    from cancerllm_jax.train.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    got = absolute_paths({"model": "tiny", "data": {"path": "lnk/../x.jsonl", "sources": ["n/*.jsonl", "~/y"],
                                                    "tokenizer": "mistral-v1", "eval_path": None}})
    assert got == {"model": "tiny", "data": {"path": str(tmp_path / "lnk/../x.jsonl"),
                                             "sources": [str(tmp_path / "n/*.jsonl"), os.path.expanduser("~/y")],
                                             "tokenizer": "mistral-v1", "eval_path": None}}
    cfg = cj.config.PRESETS["tiny"]
    logs = []
    monkeypatch.setattr(logging.getLogger("cancerllm_jax.config"), "warning", lambda *a: logs.append(a))
    to_hf_config(cfg, source={"is_causal": True, "attention_chunk_size": None})
    assert not logs
    to_hf_config(cfg, source={"is_causal": True, "my_key": 1})
    assert logs and "my_key" in logs[0]


def test_a_sharded_folder_of_the_hugging_face_cache_loads(tmp_path):
    """The hub cache's ``snapshots/<rev>/`` holds links to ``../../blobs/<sha>``: each shard was refused as "outside"
    the folder (the link was followed before the check). A name in the index that leaves the folder still is."""
    import json
    import shutil

    src = str(tmp_path / "src")
    _tiny_llama(str(tmp_path / "single")).save_pretrained(src, max_shard_size="20KB")
    assert "model.safetensors" not in os.listdir(src)
    snap, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(src))):
        shutil.copy(os.path.join(src, name), blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
    assert sum(n.endswith(".safetensors") for n in os.listdir(snap)) > 1
    ids = (np.arange(12, dtype=np.int32)[None] * 5) % 97
    assert _same_logits_as_transformers(str(snap), ids) <= 1e-4
    index = snap / "model.safetensors.index.json"
    conf = json.loads(index.read_text())
    first = next(iter(conf["weight_map"]))
    conf["weight_map"][first] = "../../blobs/blob0"
    index.unlink()
    index.write_text(json.dumps(conf))
    from cancerllm_jax.checkpoint.hf import safetensors_files

    with pytest.raises(UserError, match=r"names \.\./\.\./blobs/blob0, which is outside"):
        safetensors_files(str(snap))


def test_a_big_checkpoint_is_restored_leaf_by_leaf_to_the_same_weights(hf_fp32, tmp_path, monkeypatch):
    from cancerllm_jax.api import read_weights
    from cancerllm_jax.checkpoint import orbax_io

    _, folder = hf_fp32
    ckpt = str(tmp_path / "ckpt")
    assert run_cli("from-hf", folder, ckpt) == 0
    whole = read_weights(ckpt).params
    calls = []
    leafwise = orbax_io._restore_leafwise
    monkeypatch.setattr(orbax_io, "_restore_leafwise", lambda *a: calls.append(1) or leafwise(*a))
    monkeypatch.setattr(orbax_io, "LEAFWISE_BYTES", 0)  # as a 7B model is read
    parts = read_weights(ckpt).params
    assert calls
    import jax

    assert jax.tree.structure(parts) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


MEMORY_PROBE = """
import sys, threading, time
sys.path.insert(0, "tools")
def anon():  # resident memory, mapped file pages included (a read shard kept mapped is counted)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
import convert_checkpoint as convert
from cancerllm_jax.checkpoint import orbax_io
orbax_io.SAVE_WINDOW_GB, orbax_io.LEAFWISE_BYTES = 0.05, 0  # the limits a 7B model meets, scaled to this one
import jax
jax.numpy.zeros(1)
base = peak = anon()
def watch():
    global peak
    while True:
        peak = max(peak, anon())
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
code = convert.main(sys.argv[1:])
time.sleep(0.05)
print("GROWTH", peak - base)
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_a_conversion_never_holds_two_copies_of_the_model(tmp_path):
    """from-hf and to-hf grow the process's resident memory by under two copies of the model (1.6 here) (they held
    ~2.8 copies before they streamed: a whole-tree Orbax save or restore, then every shard's tensors as bytes, and
    the source shards stayed mapped)."""
    d, f, v, layers = 512, 2048, 32000, 8
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((v, d), np.float32),
         "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": rng.standard_normal((v, d), np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(d, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                  p + "self_attn.q_proj.weight": rng.standard_normal((512, d), np.float32),
                  p + "self_attn.k_proj.weight": rng.standard_normal((128, d), np.float32),
                  p + "self_attn.v_proj.weight": rng.standard_normal((128, d), np.float32),
                  p + "self_attn.o_proj.weight": rng.standard_normal((d, 512), np.float32),
                  p + "mlp.gate_proj.weight": rng.standard_normal((f, d), np.float32),
                  p + "mlp.up_proj.weight": rng.standard_normal((f, d), np.float32),
                  p + "mlp.down_proj.weight": rng.standard_normal((d, f), np.float32)})
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    size = sum(a.nbytes for a in t.values())  # 241 MiB
    del t
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="mistral", vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, torch_dtype="float32")))
    for args in (["from-hf", hf, tmp_path / "ckpt"], ["to-hf", tmp_path / "ckpt", tmp_path / "back"]):
        p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, args)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        growth = int(p.stdout.split("GROWTH")[-1]) / size
        assert growth < 1.9, f"{args[0]}: grew by {growth:.2f} copies of the model"


def test_a_tied_folder_that_stores_its_head_too_round_trips_bit_identically(tmp_path):
    """Some saves store ``lm_head.weight`` beside tied embeddings (equal to them): HF → ours → HF gives it back (the
    export left it out; transformers' own saves do not store it, and neither does our export of those)."""
    src = str(tmp_path / "src")
    make_model(tied=True, seed=2).save_pretrained(src, safe_serialization=True)
    t = tensors(src)
    assert "lm_head.weight" not in t
    plain = str(tmp_path / "plain")
    assert run_cli("from-hf", src, str(tmp_path / "c0")) == 0 and run_cli("to-hf", str(tmp_path / "c0"), plain) == 0
    assert set(tensors(plain)) == set(t)  # transformers' form stays without the head
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    save_file(t, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    ckpt, back, direct = str(tmp_path / "c"), str(tmp_path / "back"), str(tmp_path / "direct")
    assert run_cli("from-hf", src, ckpt) == 0 and run_cli("to-hf", ckpt, back) == 0
    assert run_cli("to-hf", src, direct) == 0  # an HF folder exported as it is
    for out in (tensors(back), tensors(direct)):
        assert set(out) == set(t)
        assert all(out[k].tobytes() == v.tobytes() for k, v in t.items())
