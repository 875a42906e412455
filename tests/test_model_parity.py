"""Our forward pass against transformers' MistralForCausalLM / LlamaForCausalLM on random tiny configs, fp32."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

import cancerllm_jax as cj
from cancerllm_jax.config import read_hf_config

# name -> (architecture, HF config kwargs, sequence length). Together they cover: a sequence longer than the
# sliding window, GQA group sizes 1 / 2 / 4+, tied and untied embeddings, head_dim != hidden/heads,
# rope theta != 10000 and random (non-trivial) norm weights (every config).
CONFIGS = {
    "mistral_window_gqa2_tied": ("mistral", {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": 5, "tie_word_embeddings": True}, 17),
    "mistral_mha_headdim_theta": ("mistral", {
        "hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 16, "sliding_window": 8, "rope_theta": 1234.5}, 20),
    "llama_gqa4_theta_untied": ("llama", {
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "rope_theta": 500000.0, "tie_word_embeddings": False}, 13),
    "llama_mqa8_headdim_tied": ("llama", {
        "hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 8, "rope_theta": 100000.0, "tie_word_embeddings": True}, 11),
    "mistral_gqa3_no_window": ("mistral", {
        "hidden_size": 36, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 10, "sliding_window": None, "rms_norm_eps": 1e-5}, 9),
    # RoPE scaling: Llama 3.1's (low frequencies divided, a ramp, high kept: an original context of 64 puts
    # frequencies in all three bands) and linear
    "llama_rope_llama3": ("llama", {
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_theta": 50000.0,
        "rope": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}}, 40),
    "mistral_rope_linear": ("mistral", {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": 30, "rope": {"rope_type": "linear", "factor": 3.0}}, 36),
    # past 128 tokens the attention runs in query blocks (causal_attention): 2 blocks, the second past the window
    "mistral_blocks_window": ("mistral", {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": 100}, 250),
}
VOCAB = 97


def make_hf_model(arch: str, kwargs: dict, seed: int = 0):
    """A random HF model with non-trivial norm weights (uniform 0.5..1.5) and larger-than-default init."""
    kwargs = dict(kwargs)
    theta = kwargs.pop("rope_theta", 10000.0)
    rope = kwargs.pop("rope", {"rope_type": "default"})
    cls_cfg = transformers.MistralConfig if arch == "mistral" else transformers.LlamaConfig
    cfg = cls_cfg(vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
                  rope_parameters={**rope, "rope_theta": theta}, **kwargs)
    torch.manual_seed(seed)
    cls = transformers.MistralForCausalLM if arch == "mistral" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ref_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def to_old_config_form(folder: str) -> None:
    """Rewrite config.json in the pre-transformers-5 form: top-level ``rope_theta``, no ``rope_parameters``; a
    scaled RoPE as ``rope_scaling``."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        conf = json.load(f)
    rope = conf.pop("rope_parameters")
    conf["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        conf["rope_scaling"] = rope
    with open(path, "w", encoding="utf-8") as f:
        json.dump(conf, f)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """name -> (hf model with eager attention, folder); odd configs are saved in the old config.json form."""
    out = {}
    for n, (name, (arch, kwargs, _)) in enumerate(CONFIGS.items()):
        model = make_hf_model(arch, kwargs, seed=n)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        if n % 2:
            to_old_config_form(folder)
        model.config._attn_implementation = "eager"
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(saved_models, name):
    _, kwargs, seq = CONFIGS[name]
    model, folder = saved_models[name]
    rng = np.random.default_rng(len(name))
    ids = rng.integers(0, VOCAB, size=(2, seq), dtype=np.int32)
    ours = cj.load(folder, dtype="float32").logits(ids)
    ref = ref_logits(model, ids)
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-4, f"{name}: max|dlogit| {diff:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    if kwargs.get("sliding_window") and seq > kwargs["sliding_window"]:  # the window really changes the output
        model.config.sliding_window = None
        try:
            assert float(np.abs(ref_logits(model, ids) - ref).max()) > 1e-3
        finally:
            model.config.sliding_window = kwargs["sliding_window"]


def test_rope_scaling_frequencies_match_transformers(saved_models):
    """Scaled RoPE frequencies equal transformers' (and differ from unscaled ones, so the logits test can fail);
    the exported config.json round-trips them."""
    import dataclasses

    from cancerllm_jax.config import from_hf_config, to_hf_config
    from cancerllm_jax.model.mistral import rope_inv_freq

    for name in ("llama_rope_llama3", "mistral_rope_linear"):
        model, folder = saved_models[name]
        cfg = read_hf_config(folder)
        assert cfg.rope_type == CONFIGS[name][1]["rope"]["rope_type"]
        ref = model.model.rotary_emb.inv_freq.numpy()
        ours = rope_inv_freq(cfg)
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_type="default"))
        assert float(np.max(np.abs(plain - ref) / ref)) > 0.5, name
        assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg)))) == cfg
    # llama3: all three bands present (divided, ramp, kept)
    cfg = read_hf_config(saved_models["llama_rope_llama3"][1])
    ratio = rope_inv_freq(dataclasses.replace(cfg, rope_type="default")) / rope_inv_freq(cfg)
    assert np.isclose(ratio, 8.0).any() and np.isclose(ratio, 1.0).any() and ((ratio > 1.01) & (ratio < 7.9)).any()


def test_config_forms_parse_the_same(saved_models):
    """Both config.json forms give the same theta, and a window longer than the sequence is really exercised."""
    for n, (name, (arch, kwargs, seq)) in enumerate(CONFIGS.items()):
        cfg = read_hf_config(saved_models[name][1])
        assert cfg.rope_theta == kwargs.get("rope_theta", 10000.0), name
        assert cfg.model_type == arch
        assert cfg.tie_embeddings == kwargs.get("tie_word_embeddings", False)
        if arch == "llama":
            assert cfg.sliding_window is None
    forms = set()
    for _, folder in saved_models.values():
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            forms.add("rope_parameters" in json.load(f))
    assert forms == {True, False}
    windowed = [s > k["sliding_window"] for a, k, s in CONFIGS.values() if k.get("sliding_window")]
    assert windowed and all(windowed)


def test_packed_documents_are_independent(saved_models):
    """A document's logits do not change when another document precedes it in the row (segments + positions)."""
    import jax.numpy as jnp

    _, folder = saved_models["mistral_window_gqa2_tied"]
    lm = cj.load(folder, dtype="float32")
    rng = np.random.default_rng(7)
    doc_a = rng.integers(0, VOCAB, size=9)
    doc_b = rng.integers(0, VOCAB, size=12)  # longer than the window (5)
    row = np.concatenate([doc_a, doc_b])[None]
    positions = np.concatenate([np.arange(9), np.arange(12)])[None]
    segments = np.concatenate([np.full(9, 1), np.full(12, 2)])[None]
    packed, _ = lm.model(jnp.asarray(row, jnp.int32), jnp.asarray(positions, jnp.int32),
                         jnp.asarray(segments, jnp.int32))
    alone = lm.logits(doc_b[None].astype(np.int32))
    first = lm.logits(doc_a[None].astype(np.int32))
    packed = np.asarray(packed, np.float32)
    assert float(np.abs(packed[0, 9:] - alone[0]).max()) <= 1e-5
    assert float(np.abs(packed[0, :9] - first[0]).max()) <= 1e-5


@pytest.mark.parametrize("seq", [17, 200])
def test_attention_mask_matches_transformers(saved_models, seq):
    """``lm.logits(ids, attention_mask)`` on left-padded, right-padded and holed rows (past the window of 5) equals
    transformers' forward with the same mask at every real token, and a padded row equals the row alone; at 200
    tokens the attention runs in query blocks (``causal_attention``), holes and padding in both blocks."""
    model, folder = saved_models["mistral_window_gqa2_tied"]
    ids = np.random.default_rng(5).integers(0, VOCAB, size=(4, seq), dtype=np.int32)
    mask = np.ones((4, seq), np.int32)
    holes = [2, 3, 9] + ([seq - 60, seq - 59] if seq > 128 else [])
    mask[1, :6], mask[2, seq - 6:], mask[3, holes] = 0, 0, 0
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask)).logits.numpy()
    lm = cj.load(folder, dtype="float32")
    ours = lm.logits(ids, attention_mask=mask)
    real = mask.astype(bool)
    assert float(np.abs(ours - ref)[real].max()) <= 1e-4
    for r in (1, 2):
        assert float(np.abs(lm.logits(ids[r][real[r]]) - ours[r][real[r]]).max()) <= 1e-5
    assert float(np.abs(lm.logits(ids)[1] - ours[1])[real[1]].max()) > 1e-2  # the mask really matters


@pytest.mark.parametrize("name", ["mistral_window_gqa2_tied", "llama_gqa4_theta_untied"])
def test_bf16_matches_transformers_in_bf16(saved_models, name):
    """bf16 weights and compute against transformers in bf16. One token per row (attention is then the identity
    on V): every rounding is transformers', so the logits are equal bit for bit, compiled and op by op (RMSNorm's
    input was the unrounded fp32 residual sum under XLA's excess precision: 24 % equal; SiLU as x·sigmoid(x)
    rounded twice: 26 % op by op). A longer row stays within transformers' own bf16 error."""
    _, folder = saved_models[name]
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                  attn_implementation="eager").eval()
    lm = cj.load(folder, dtype="bfloat16")
    tokens = np.arange(VOCAB, dtype=np.int32)[:, None]
    ref = ref_logits(ref_model, tokens)
    assert (lm.logits(tokens) == ref).mean() >= 0.999
    import jax
    import jax.numpy as jnp

    with jax.disable_jit():  # op by op, each rounded to bf16 (as a backend with native bf16 arithmetic may do)
        eager = np.asarray(lm.model(jnp.asarray(tokens))[0], np.float32)
    assert (eager == ref).mean() >= 0.999
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(4, CONFIGS[name][2]), dtype=np.int32)
    ref = ref_logits(ref_model, ids)
    exact = ref_logits(saved_models[name][0], ids)
    assert np.abs(lm.logits(ids) - ref).mean() <= np.abs(ref - exact).mean()


def test_check_parity_cli(saved_models, tmp_path, capsys):
    """tools/check_parity.py: passes on our tiny model (JSONL prompts), exits 1 past tolerance, writes --json."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tool_check_parity", os.path.join(root, "tools", "check_parity.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, folder = saved_models["llama_gqa4_theta_untied"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "ER+/PR+, HER2- breast ca"}\n{"text": "nsclc with mets"}\n', encoding="utf-8")
    out = tmp_path / "parity.json"
    assert tool.main(["--hf-dir", folder, "--prompts", str(prompts), "--json", str(out), "--tol", "1e-4"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["failed"] == 0 and len(result["prompts"]) == 2
    assert all(r["argmax_agree_pct"] == 100.0 and r["max_abs_diff"] <= 1e-4 for r in result["prompts"])
    assert "breast" not in out.read_text(encoding="utf-8") and len(result["prompts"][0]["prompt_sha256"]) == 16
    assert tool.main(["--hf-dir", folder, "--prompts", str(prompts), "--tol", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_parity_cli_on_a_mistral_folder_with_its_sentencepiece_tokenizer(tmp_path, capsys):
    """A Mistral folder with the v0.1 ``tokenizer.model`` (as a fine-tune exported by ``to-hf`` has): transformers 5
    sends it to a tokenizer backend not installed here, so the tool encodes with ours (it stopped as "a bug")."""
    import importlib.util
    import shutil

    import transformers

    from cancerllm_jax.data.tokenizer import mistral_v1_model_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tool_check_parity", os.path.join(root, "tools", "check_parity.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(mistral_v1_model_file(), tmp_path / "tokenizer.model")
    assert tool.main(["--hf-dir", str(tmp_path), "--tol", "1e-4"]) == 0
    assert "FAIL" not in capsys.readouterr().out


SHAPE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 16}
# config.json dicts that leave keys out or set them oddly; ours must resolve each as transformers' config class does
HF_DICTS = {
    "mistral_use_sliding_window_false": {"model_type": "mistral", **SHAPE, "sliding_window": 5,
                                         "use_sliding_window": False},
    "mistral_no_window_key": {"model_type": "mistral", **SHAPE},  # every optional key missing: 4096, 8 KV heads, ...
    "mistral_window_null": {"model_type": "mistral", **SHAPE, "sliding_window": None, "num_key_value_heads": 2},
    "llama_no_kv_heads": {"model_type": "llama", **SHAPE, "sliding_window": 7},
    "mistral_nulls": {"model_type": "mistral", **SHAPE, "head_dim": None, "bos_token_id": None,
                      "eos_token_id": [5, 3], "pad_token_id": 0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "mistral_theta_forms": {"model_type": "mistral", **SHAPE, "rope_theta": 9.0, "rope_parameters": {"rope_theta": 7.0},
                            "max_position_embeddings": 64, "head_dim": 16},
    "llama_rope_scaling_over_parameters": {"model_type": "llama", **SHAPE, "rope_theta": 500000.0,
                                           "rope_scaling": {"rope_type": "default"},
                                           "rope_parameters": {"rope_theta": 7.0}},
    "mistral_attention_bias_ignored": {"model_type": "mistral", **SHAPE, "attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("extra,needle", [({"attention_bias": True}, "attention_bias=true is not supported"),
                                          ({"mlp_bias": True}, "mlp_bias=true is not supported"),
                                          ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'")])
def test_llama_features_we_do_not_compute_are_refused_not_ignored(extra, needle):
    """transformers' Llama adds these biases / this activation: a model loaded without them would be another model."""
    from cancerllm_jax.config import from_hf_config
    from cancerllm_jax.errors import UserError

    with pytest.raises(UserError, match=needle):
        from_hf_config({"model_type": "llama", **SHAPE, **extra})


@pytest.mark.parametrize("name", list(HF_DICTS))
def test_hf_config_keys_resolve_like_transformers(name):
    """Defaults, nulls, ``use_sliding_window`` and the rope-theta forms: ``from_hf_config`` == transformers."""
    from cancerllm_jax.config import from_hf_config

    conf = HF_DICTS[name]
    ours = from_hf_config(json.loads(json.dumps(conf)))
    cls = transformers.MistralConfig if conf["model_type"] == "mistral" else transformers.LlamaConfig
    ref = cls.from_dict(json.loads(json.dumps(conf)))
    eos = ref.eos_token_id if isinstance(ref.eos_token_id, list) else [ref.eos_token_id]
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
            ours.num_kv_heads, ours.head_dim, ours.rope_theta, ours.rms_norm_eps, ours.sliding_window,
            ours.tie_embeddings, ours.max_position_embeddings, ours.bos_token_id, ours.eos_token_id,
            ours.pad_token_id) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
        ref.num_key_value_heads, ref.head_dim, ref.rope_parameters["rope_theta"], ref.rms_norm_eps,
        getattr(ref, "sliding_window", None) if conf["model_type"] == "mistral" else None,
        ref.tie_word_embeddings, ref.max_position_embeddings, ref.bos_token_id, eos[0], ref.pad_token_id)
    assert list(ours.eos_token_ids) == eos


def test_a_null_rope_type_reads_the_legacy_type():
    """``{"rope_type": null, "type": "linear", ...}``: the legacy key is read (it was unscaled RoPE, silently)."""
    from cancerllm_jax.config import from_hf_config

    cfg = from_hf_config({"model_type": "llama", **SHAPE,
                          "rope_scaling": {"rope_type": None, "type": "linear", "factor": 4.0}})
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)


def test_use_sliding_window_false_keeps_the_window_like_transformers(tmp_path):
    """transformers' Mistral ignores ``use_sliding_window``: the window (5) still applies to a sequence of 17."""
    model = make_hf_model("mistral", {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 5}, seed=3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_sliding_window": False}))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 17), dtype=np.int32)
    ref = ref_logits(ref_model, ids)
    assert float(np.abs(ref_logits(model, ids) - ref).max()) <= 1e-4  # transformers itself kept the window
    ours = cj.load(str(tmp_path), dtype="float32").logits(ids)
    assert float(np.abs(ours - ref).max()) <= 1e-4


@pytest.mark.parametrize("rope,words", [
    ({"rope_type": "dynamic", "factor": 2.0}, ["rope_type 'dynamic' is not supported"]),
    ({"rope_type": "yarn", "factor": 2.0}, ["rope_type 'yarn' is not supported"]),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, ["needs", "high_freq_factor"]),
    ({"rope_type": "linear"}, ["needs", "factor"]),
    ({"rope_type": "linear", "factor": -2.0}, ["rope_factor must be positive"]),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, ["rope_low_freq_factor < rope_high_freq_factor"]),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    # per layer type (Ministral's form): transformers fails on it or silently runs the default RoPE
    ({"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}, ["per layer type",
                                                                                     "full_attention"]),
])
def test_unsupported_rope_parameters_are_one_clear_error(rope, words):
    """A RoPE we do not compute as transformers does is refused, never run as plain RoPE."""
    from cancerllm_jax.config import from_hf_config
    from cancerllm_jax.errors import UserError

    with pytest.raises(UserError) as e:
        from_hf_config({"model_type": "llama", **SHAPE, "rope_parameters": {"rope_theta": 10000.0, **rope}})
    for w in words:
        assert w in str(e.value)


def test_rope_frequencies_within_an_ulp_of_transformers():
    """Every theta / head size: our inverse frequencies equal transformers' but for rare 1-ulp differences
    (torch's float32 power is not always the correctly rounded one). An ulp matters: at position 8000 the angle
    error reaches ~5e-4 rad; numpy's own float32 power was off in ~20 % of the entries."""
    from cancerllm_jax.config import from_hf_config
    from cancerllm_jax.model.mistral import rope_inv_freq

    total = differ = 0
    for theta in (10000.0, 500000.0, 1e6, 1234.5, 1e8):
        for head_dim in (8, 10, 64, 80, 128):
            conf = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                            num_hidden_layers=1, intermediate_size=8, vocab_size=8,
                                            rope_parameters={"rope_type": "default", "rope_theta": theta})
            ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(conf).inv_freq.numpy()
            ours = rope_inv_freq(from_hf_config(conf.to_dict()))
            np.testing.assert_allclose(ours, ref, rtol=1.2e-7, atol=0)
            total, differ = total + ref.size, differ + int((ours != ref).sum())
    assert differ <= 0.03 * total, f"{differ} of {total} frequencies differ"


@pytest.mark.parametrize("low,high,original,factor", [(0.5, 5.0, 3000, 8.0), (1.5, 3.3, 100, 3.0),
                                                      (1.1, 4.0, 1000, 7.3), (1.0, 4.0, 8192, 8.0)])
def test_llama3_ramp_is_bit_exact(low, high, original, factor):
    """Where the unscaled frequencies agree exactly (theta 1e4, head_dim 64), llama3's scaled ones do too: torch
    rounds ``2π / inv_freq`` as ``(1 / inv_freq) · 2π`` (off by an ulp in a third of such configs before)."""
    from cancerllm_jax.config import from_hf_config
    from cancerllm_jax.model.mistral import rope_inv_freq

    conf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, num_hidden_layers=1,
                                    intermediate_size=8, vocab_size=8, rope_parameters={
                                        "rope_type": "llama3", "rope_theta": 1e4, "factor": factor,
                                        "low_freq_factor": low, "high_freq_factor": high,
                                        "original_max_position_embeddings": original})
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(conf).inv_freq.numpy()
    np.testing.assert_array_equal(rope_inv_freq(from_hf_config(conf.to_dict())), ref)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ROPE_DICTS = {  # config.json forms of a scaled RoPE, resolved as transformers' standardize_rope_params does
    "legacy_type_key": {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama3_original_in_dict": {"rope_parameters": {**LLAMA3, "rope_theta": 5e5,
                                                    "original_max_position_embeddings": 64}},
    "llama3_original_top_level_wins": {"original_max_position_embeddings": 32, "rope_theta": 5e5,
                                       "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 64}},
    "llama3_original_from_max_positions": {"max_position_embeddings": 48,
                                           "rope_parameters": {**LLAMA3, "rope_theta": 5e5}},
}


@pytest.mark.parametrize("name", list(ROPE_DICTS))
def test_rope_config_forms_resolve_like_transformers(name):
    from cancerllm_jax.config import from_hf_config
    from cancerllm_jax.model.mistral import rope_inv_freq

    conf = {"model_type": "llama", **SHAPE, "head_dim": 32, **ROPE_DICTS[name]}
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig.from_dict(json.loads(json.dumps(conf)))).inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(from_hf_config(json.loads(json.dumps(conf)))), ref, rtol=1.2e-7)


def test_a_float32_model_asks_for_full_float32_products():
    """Every matrix product of a float32 model (forward, cached decode step, LoRA backward) is 'highest': JAX's
    default on a GPU rounds float32 operands to TF32, ~1e-3 relative off transformers' float32 (torch keeps TF32
    off by default). The CPU computes both alike, so the jaxpr is what can tell."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cancerllm_jax.config import LoRAConfig, ModelConfig
    from cancerllm_jax.model import create_model

    def precisions(fn, *args):
        text = str(jax.make_jaxpr(fn)(*args))
        return [re.search(r"precision=(\S*)", text[m.start():m.start() + 300])
                for m in re.finditer("dot_general", text)]

    cfg = ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8)
    gd, lora, rest = nnx.split(create_model(cfg, LoRAConfig(rank=2, alpha=4, targets=("q", "down"))), nnx.LoRAParam,
                               ...)
    ids = jnp.zeros((1, 4), jnp.int32)
    model = nnx.merge(gd, lora, rest)
    found = (precisions(jax.grad(lambda lo: nnx.merge(gd, lo, rest)(ids)[0].sum()), lora)
             + precisions(lambda t: model(t, cache=model.init_cache(1, 8))[0], ids[:, :1]))
    assert len(found) > 30 and all(p and p.group(1) == "(Precision.HIGHEST," for p in found)
