"""LoRA import: a PEFT adapter that peft made (``get_peft_model`` + ``save_pretrained``) used on its HF base through
``cj.load(base, adapter=...)``, ``convert_checkpoint.py from-hf --peft-adapter`` and ``generate.py --adapter``."""
from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import cancerllm_jax as cj
from cancerllm_jax import api
from cancerllm_jax.checkpoint.hf import read_hf, write_hf
from cancerllm_jax.checkpoint.peft import HF_MODULES, read_peft_adapter
from cancerllm_jax.config import LoRAConfig, read_hf_config
from cancerllm_jax.errors import UserError
from cancerllm_jax.model.lora import merge_lora_params
from helpers import one_clear_error
from test_bad_inputs import run_cli
from test_peft_export import convert, hf_base, random_lora, torch_logits

VOCAB = 53
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CONFIGS = {  # MHA untied; GQA with head_dim != hidden / heads and tied embeddings
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_headdim_tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
IDS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 15))  # longer than the window of 6


def make_adapter(folder, layers: int = 2, hidden: int = 32, seed: int = 0, targets=TARGETS, r: int = 4,
                 std: float = 0.2, base_dtype=torch.float32, peft_kw: dict | None = None, **kw):
    """Save a tiny random HF Mistral (``base_dtype``) to ``folder/base`` and a peft adapter (``peft_kw``: more
    LoraConfig fields) with random (non-zero) factors on it to ``folder/adapter``; returns ``(base, adapter, peft
    logits of IDS, base logits of IDS)``, both computed in fp32."""
    torch.manual_seed(seed)
    hf_cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48,
                                        num_hidden_layers=layers, sliding_window=6, max_position_embeddings=128,
                                        initializer_range=0.1, **kw)
    base, adapter = os.path.join(folder, "base"), os.path.join(folder, "adapter")
    transformers.MistralForCausalLM(hf_cfg).to(base_dtype).save_pretrained(base, safe_serialization=True)
    pconf = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM",
                            **(peft_kw or {}))
    pmodel = peft.get_peft_model(hf_base(base), pconf).eval()
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_" in name:  # peft starts B at zero: the adapter would change nothing
                p.normal_(0, std)
    pmodel.save_pretrained(adapter)
    return base, adapter, torch_logits(pmodel, IDS), torch_logits(hf_base(base), IDS)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def made(request, tmp_path_factory):
    return make_adapter(str(tmp_path_factory.mktemp(request.param)), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    return make_adapter(str(tmp_path_factory.mktemp("mha")), **CONFIGS["mha"])


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("merge", [True, False])
def test_load_with_adapter_equals_peft(made, merge):
    base, adapter, ref, base_only = made
    assert max_diff(ref, base_only) > 1e-2, "the adapter must change the logits"
    lm = cj.load(base, adapter=adapter, merge_lora=merge)
    assert max_diff(lm.logits(IDS), ref) <= 1e-4
    assert lm.adapter == os.path.abspath(adapter) and lm.source == os.path.abspath(base)
    assert hasattr(lm.model.layers.q, "lora_a") != merge  # unmerged: the LoRA branch is in the model


def test_adapter_on_a_run_merges_the_runs_lora_first(mha, tmp_path, monkeypatch):
    """A base that carries its own LoRA (a run) is merged first; the adapter goes on the merged weights."""
    base, adapter, _, _ = mha
    cfg, params = read_hf(base)
    run_lora = LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="all")
    run_lp = random_lora(cfg, run_lora, seed=5)
    write_hf(str(tmp_path / "merged"), cfg, merge_lora_params(params, run_lp, run_lora))
    ref = torch_logits(peft.PeftModel.from_pretrained(hf_base(str(tmp_path / "merged")), adapter).eval(), IDS)
    run = api.LoadedWeights(cfg, params, lora=run_lora, lora_params=run_lp, source="run")
    monkeypatch.setattr(api, "read_weights", lambda path, dtype=None: run)
    for merge in (True, False):
        assert max_diff(cj.load(base, adapter=adapter, merge_lora=merge).logits(IDS), ref) <= 1e-4


def test_from_hf_with_adapter_and_back(mha, tmp_path):
    base, adapter, ref, _ = mha
    out = str(tmp_path / "ckpt")
    assert convert.main(["from-hf", base, out, "--peft-adapter", adapter]) == 0
    meta = json.load(open(os.path.join(out, "cancerllm.json")))
    assert meta["lora"]["rank"] == 4 and meta["adapter"]["source"] == os.path.abspath(adapter)
    for merge in (True, False):
        assert max_diff(cj.load(out, merge_lora=merge).logits(IDS), ref) <= 1e-4
    # the converted checkpoint keeps the factors (float32 even on a bf16 base): to-hf --peft-adapter gives peft's
    # tensors back, bit for bit
    bf16 = str(tmp_path / "bf16")
    assert convert.main(["from-hf", base, bf16, "--peft-adapter", adapter, "--dtype", "bfloat16"]) == 0
    a = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    for ckpt in (out, bf16):
        back = str(tmp_path / f"back_{os.path.basename(ckpt)}")
        assert convert.main(["to-hf", ckpt, back, "--peft-adapter"]) == 0
        b = load_file(os.path.join(back, "adapter_model.safetensors"))
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
        conf = json.load(open(os.path.join(back, "adapter_config.json")))
        assert conf["base_model_name_or_path"] == json.load(open(os.path.join(adapter, "adapter_config.json")))[
            "base_model_name_or_path"]
    # --merge-lora folds it in: a plain converted checkpoint, and to-hf of it is plain transformers
    merged = str(tmp_path / "merged")
    assert convert.main(["from-hf", base, merged, "--peft-adapter", adapter, "--merge-lora"]) == 0
    assert "lora" not in json.load(open(os.path.join(merged, "cancerllm.json")))
    assert not os.path.exists(os.path.join(merged, "lora"))
    assert convert.main(["to-hf", merged, str(tmp_path / "hf")]) == 0
    assert max_diff(torch_logits(hf_base(str(tmp_path / "hf")), IDS), ref) <= 1e-4


def test_adapter_weights_are_part_of_the_fingerprint(mha, tmp_path):
    """A converted checkpoint's LoRA, and an adapter loaded on a model, count as weights in eval provenance."""
    from cancerllm_jax.eval.robustness import model_key
    from cancerllm_jax.eval.runner import model_fingerprint

    base, adapter, _, _ = mha
    out = str(tmp_path / "ckpt")
    assert convert.main(["from-hf", base, out, "--peft-adapter", adapter]) == 0
    before = model_fingerprint(out)["weights"]
    lora_files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(out, "lora")) for n in names]
    os.utime(lora_files[0], ns=(1, 1))
    assert model_fingerprint(out)["weights"] != before
    plain = model_key(SimpleNamespace(source=base, adapter=None))
    tuned = model_key(SimpleNamespace(source=base, adapter=adapter))
    assert "model_adapter" not in plain and tuned["model_adapter"]["path"] == os.path.realpath(adapter)
    os.utime(os.path.join(adapter, "adapter_model.safetensors"), ns=(1, 1))
    assert model_key(SimpleNamespace(source=base, adapter=adapter)) != tuned


@pytest.fixture(scope="module")
def other_adapters(tmp_path_factory):
    """Adapters made by peft for bases with another layer count / hidden size."""
    root, kw = tmp_path_factory.mktemp("other"), CONFIGS["mha"]
    return {"layers": make_adapter(str(root / "layers"), layers=3, **kw)[1],
            "fewer_layers": make_adapter(str(root / "fewer"), layers=1, **kw)[1],
            "hidden": make_adapter(str(root / "hidden"), hidden=48, **kw)[1]}


@pytest.mark.parametrize("case, needles", [
    ("missing", ["nope", "not found"]),
    ("layers", ["adapter_model.safetensors", "unexpected", "layers.2", "2-layer model"]),
    ("fewer_layers", ["adapter_model.safetensors", "layers.1", "is missing", "another base model"]),
    ("hidden", ["adapter_model.safetensors", "shape", "another base model"]),
])
def test_wrong_adapter_is_one_clear_error(mha, other_adapters, tmp_path, capsys, case, needles):
    base = mha[0]
    adapter = other_adapters.get(case, str(tmp_path / "nope"))
    with pytest.raises(UserError) as e:
        cj.load(base, adapter=adapter)
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value)
    out = tmp_path / "out"
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", base, out, "--peft-adapter", adapter], capsys)
    one_clear_error(code, err, *needles)
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n', encoding="utf-8")
    code, err = run_cli("launch/generate.py", ["--model", base, "--adapter", adapter, "--input", inp,
                                               "--out", tmp_path / "pred.jsonl"], capsys)
    one_clear_error(code, err, *needles)


def test_merge_lora_without_adapter_is_an_error(mha, tmp_path, capsys):
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", mha[0], tmp_path / "out", "--merge-lora"],
                        capsys)
    one_clear_error(code, err, "--merge-lora needs --peft-adapter")


def test_bf16_base_with_adapter_loaded_as_float32_keeps_the_fp32_sum(tmp_path):
    """A bf16 base (as checkpoints ship) + an adapter, loaded in float32: the merged kernels keep W + B·A·α/r in
    float32 (rounding the sum back to bf16 moved the logits by ~1e-2) and equal peft on the base in float32."""
    base, adapter, ref, _ = make_adapter(str(tmp_path), hidden=64, targets="all-linear", r=8, std=0.05,
                                         base_dtype=torch.bfloat16, num_attention_heads=4, num_key_value_heads=2)
    for merge in (True, False):
        assert max_diff(cj.load(base, adapter=adapter, merge_lora=merge, dtype="float32").logits(IDS), ref) <= 1e-4


@pytest.mark.parametrize("targets", [r".*\.(q_proj|down_proj)", ["model.layers.0.self_attn.k_proj",
                                                                "model.layers.1.self_attn.k_proj", "up_proj"],
                                     ["q_proj", "v_proj", "query_key_value", "c_attn"]])
def test_target_modules_as_peft_matches_them(tmp_path, targets):
    """``target_modules`` as a regular expression (peft: the whole module name must match), as full module
    names (peft saves "all-linear" so for models of few layers), or with names of another architecture's modules
    (which peft ignores) selects the same projections as in peft."""
    base, adapter, ref, base_only = make_adapter(str(tmp_path), seed=2, targets=targets, r=2, std=0.3,
                                                 num_attention_heads=4, num_key_value_heads=2)
    lm = cj.load(base, adapter=adapter, merge_lora=False)
    assert max_diff(lm.logits(IDS), ref) <= 1e-4
    assert max_diff(ref, base_only) > 1e-2


SOME_LAYERS = {  # peft configs that adapt some layers (of 3) only
    "names": dict(targets=["model.layers.1.self_attn.o_proj", "model.layers.2.mlp.up_proj", "q_proj"]),
    "regex": dict(targets=r"model\.layers\.[02]\.(self_attn\.v_proj|mlp\.down_proj)"),
    "layers_to_transform": dict(targets=["q_proj", "down_proj"], peft_kw=dict(layers_to_transform=[0, 2])),
    "one_layer_with_pattern": dict(targets=["v_proj", "gate_proj", "o_proj"],
                                   peft_kw=dict(layers_to_transform=1, layers_pattern="layers")),
    "exclude_regex": dict(targets=["k_proj", "gate_proj"], peft_kw=dict(exclude_modules=r".*\.1\.self_attn\..*")),
    "exclude_names": dict(targets="all-linear", peft_kw=dict(exclude_modules=["model.layers.0.mlp.up_proj",
                                                                              "o_proj"])),
    "empty_layers_pattern": dict(targets=["q_proj"], peft_kw=dict(layers_to_transform=1, layers_pattern="")),
    "excluded_lm_head": dict(targets=["lm_head", "q_proj", "mlp"], peft_kw=dict(exclude_modules=["lm_head", "mlp"])),
    "embeddings_have_no_layer": dict(targets=["embed_tokens", "up_proj"], peft_kw=dict(layers_to_transform=[1, 2])),
}


@pytest.mark.parametrize("case", sorted(SOME_LAYERS))
def test_an_adapter_of_some_layers_gives_peft_logits_and_exports_back(tmp_path, case):
    """Adapters that leave some layers or projections out (names of some layers, a pattern, ``layers_to_transform``
    with or without ``layers_pattern``, ``exclude_modules``) adapt exactly the modules peft adapts: the others keep
    zero factors. Merged or kept apart, the logits are peft's; exported back as a PEFT adapter (every layer, zero
    factors where peft had none), peft gives the same logits."""
    base, adapter, ref, base_only = make_adapter(str(tmp_path), layers=3, seed=3, r=2, std=0.3, num_attention_heads=4,
                                                 num_key_value_heads=2, **SOME_LAYERS[case])
    assert max_diff(ref, base_only) > 1e-2
    pmodel = peft.PeftModel.from_pretrained(hf_base(base), adapter)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
               for n, _ in pmodel.named_parameters() if n.endswith("lora_A.default.weight")}
    _, lora_params = read_peft_adapter(adapter, read_hf_config(base))
    ours = {f"model.layers.{i}.{HF_MODULES[t]}" for t, f in lora_params["layers"].items() for i in range(3)
            if np.abs(f["lora_b"][i]).max() > 0}
    assert ours == adapted
    assert max_diff(cj.load(base, adapter=adapter, merge_lora=False).logits(IDS), ref) <= 1e-4
    assert max_diff(cj.load(base, adapter=adapter).logits(IDS), ref) <= 1e-4
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert convert.main(["from-hf", base, ckpt, "--peft-adapter", adapter]) == 0
    assert convert.main(["to-hf", ckpt, back, "--peft-adapter"]) == 0
    assert max_diff(torch_logits(peft.PeftModel.from_pretrained(hf_base(base), back).eval(), IDS), ref) <= 1e-4


def test_an_adapter_of_some_layers_is_checked_against_its_config(tmp_path):
    """The tensors must be those of the modules the config adapts: one missing, or one for a module it leaves out,
    is an error naming the tensor; malformed layer fields are errors naming the field."""
    from safetensors.numpy import save_file

    base, adapter, _, _ = make_adapter(str(tmp_path), layers=3, seed=4, r=2, targets=["q_proj"], num_attention_heads=4,
                                       num_key_value_heads=2,
                                       peft_kw=dict(layers_to_transform=[0, 2]))
    conf_path = os.path.join(adapter, "adapter_config.json")
    conf = json.load(open(conf_path))
    weights = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(weights)
    for layers, match in (([0], "unexpected tensor.*layers.2.self_attn.q_proj.lora_A"),
                          ([0, 1, 2], "tensor .*layers.1.self_attn.q_proj.lora_A.weight is missing"),
                          ("1", "layers_to_transform must be a layer index or a list of them"),
                          ([0, True], "layers_to_transform must be")):
        json.dump({**conf, "layers_to_transform": layers}, open(conf_path, "w"))
        with pytest.raises(UserError, match=match):
            cj.load(base, adapter=adapter)
    for field, value, match in (("exclude_modules", 5, "exclude_modules must be a string or a list of strings"),
                                ("exclude_modules", "q_proj(", "exclude_modules 'q_proj\\(' is not a valid regular"),
                                ("target_modules", r"model\.layers\.7\.self_attn\.q_proj", "adapt none of"),
                                ("target_modules", r".*layers\.0", "adapt model.layers.0, which is not a LoRA"),
                                ("target_modules", "lm_head|.*q_proj", "adapt lm_head")):
        json.dump({**conf, "layers_to_transform": None, field: value}, open(conf_path, "w"))
        with pytest.raises(UserError, match=match):
            cj.load(base, adapter=adapter)
    json.dump({**conf, "layers_pattern": ["h", "blocks"]}, open(conf_path, "w"))  # GPT-2's, another model's
    with pytest.raises(UserError, match="adapt none of"):
        cj.load(base, adapter=adapter)
    for edit, words in (({"target_modules": ".*q_proj"}, "layers_to_transform cannot be used when target_modules is a "
                                                         "string"),  # peft's LoraConfig refuses these three
                        ({"target_modules": "all-linear", "layers_pattern": None}, "layers_to_transform cannot"),
                        ({"layers_to_transform": None, "layers_pattern": "layers"}, "layers_pattern 'layers' needs")):
        json.dump({**conf, **edit}, open(conf_path, "w"))
        with pytest.raises(UserError, match=words):
            cj.load(base, adapter=adapter)
    json.dump({**conf, "layers_to_transform": None}, open(conf_path, "w"))
    save_file({k: v for k, v in tensors.items() if ".2." not in k}, weights)
    with pytest.raises(UserError, match="layers.1.self_attn.q_proj.lora_A.weight is missing"):
        cj.load(base, adapter=adapter)


def assert_peft_logits_and_export(base: str, adapter: str, ref: np.ndarray, tmp_path) -> None:
    """Ours with ``adapter``, merged and kept apart, gives peft's logits ``ref``; ``from-hf --peft-adapter`` then
    ``to-hf --peft-adapter`` writes an adapter that gives peft the same logits."""
    for merge in (True, False):
        assert max_diff(cj.load(base, adapter=adapter, merge_lora=merge).logits(IDS), ref) <= 1e-4
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert convert.main(["from-hf", base, ckpt, "--peft-adapter", adapter]) == 0
    assert convert.main(["to-hf", ckpt, back, "--peft-adapter"]) == 0
    assert max_diff(torch_logits(peft.PeftModel.from_pretrained(hf_base(base), back).eval(), IDS), ref) <= 1e-4


def test_rslora_and_fan_in_fan_out_load_as_peft_and_export_back(mha, tmp_path):
    """``use_rslora`` (peft scales by alpha / sqrt(r)) is read exactly; ``fan_in_fan_out`` is what peft makes it on
    nn.Linear (False); the exported adapter loads in peft with the same logits."""
    base, adapter, _, _ = mha
    edited = str(tmp_path / "rslora")
    shutil.copytree(adapter, edited)
    path = os.path.join(edited, "adapter_config.json")
    conf = json.load(open(path))
    json.dump({**conf, "use_rslora": True, "fan_in_fan_out": True}, open(path, "w"))
    ref = torch_logits(peft.PeftModel.from_pretrained(hf_base(base), edited).eval(), IDS)
    assert max_diff(ref, mha[2]) > 1e-2, "rsLoRA must change the scaling"
    assert_peft_logits_and_export(base, edited, ref, tmp_path)


PATTERNS = {  # peft configs with per-module ranks and alphas (peft's get_pattern_key: a regex matching the name's end)
    "rank": dict(r=4, peft_kw=dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6})),
    "alpha": dict(r=4, peft_kw=dict(alpha_pattern={"v_proj": 3.0, "model.layers.0.self_attn.o_proj": 20})),
    "both_rslora": dict(r=3, peft_kw=dict(rank_pattern={"o_proj": 5}, alpha_pattern={"down_proj": 1.5},
                                          use_rslora=True)),
}


@pytest.mark.parametrize("case", sorted(PATTERNS))
def test_rank_and_alpha_patterns_give_peft_logits_and_export_back(tmp_path, case):
    """``rank_pattern`` / ``alpha_pattern`` (refused before): each module gets peft's rank and scale (a smaller rank
    is zero-padded to the largest, the module's own scale is a factor on its B); merged or kept apart the logits are
    peft's, and the exported plain adapter (one rank, one alpha) gives peft the same logits."""
    base, adapter, ref, _ = make_adapter(str(tmp_path), seed=5, std=0.3, num_attention_heads=4, num_key_value_heads=2,
                                         **PATTERNS[case])
    plain = str(tmp_path / "plain")  # the same factors read without the patterns: must differ
    shutil.copytree(adapter, plain)
    conf = json.load(open(os.path.join(plain, "adapter_config.json")))
    json.dump({**conf, "alpha_pattern": {}}, open(os.path.join(plain, "adapter_config.json"), "w"))
    if not conf["rank_pattern"]:
        assert max_diff(cj.load(base, adapter=plain).logits(IDS), ref) > 1e-3, "alpha_pattern must matter"
    assert_peft_logits_and_export(base, adapter, ref, tmp_path)


def test_patterns_need_no_usable_config_level_rank_or_alpha(tmp_path):
    """peft reads the config's r / lora_alpha only for modules no pattern key matches: with keys for every adapted
    module, r 0 and lora_alpha 0 load (they were refused), and a tiny lora_alpha for the others gives finite logits
    (the ratio of scales overflowed to inf, then NaN)."""
    patterns = dict(rank_pattern={"q_proj": 2, "v_proj": 3}, alpha_pattern={"q_proj": 8, "v_proj": 3})
    base, adapter, _, _ = make_adapter(str(tmp_path), seed=6, std=0.3, targets=["q_proj", "v_proj"], r=4,
                                       peft_kw=patterns, num_attention_heads=4, num_key_value_heads=2)
    path = os.path.join(adapter, "adapter_config.json")
    conf = json.load(open(path))
    for edit in ({"r": 0, "lora_alpha": 0}, {"lora_alpha": 1e-40, "alpha_pattern": {"q_proj": 8}}):
        json.dump({**conf, **edit}, open(path, "w"))
        ref = torch_logits(peft.PeftModel.from_pretrained(hf_base(base), adapter).eval(), IDS)
        for merge in (True, False):
            got = cj.load(base, adapter=adapter, merge_lora=merge).logits(IDS)
            assert np.isfinite(got).all() and max_diff(got, ref) <= 1e-4, edit
    json.dump({**conf, "r": 0, "rank_pattern": {"q_proj": 2}}, open(path, "w"))  # v_proj takes r 0
    with pytest.raises(UserError, match=r"r 0 must be positive: it is the rank of model\.layers\.0\.self_attn\.v_proj"):
        cj.load(base, adapter=adapter)


def test_fields_left_to_peft_and_a_non_positive_alpha_give_peft_logits(tmp_path):
    """A config without r / lora_alpha / target_modules (or target_modules null) reads peft's defaults (8, 8, q_proj
    and v_proj for Mistral); lora_alpha 0 or below (an adapter that subtracts) loads as peft loads it (refused
    before) and exports back."""
    base, adapter, made_ref, _ = make_adapter(str(tmp_path), seed=8, std=0.3, targets=["q_proj", "v_proj"], r=8,
                                              num_attention_heads=4, num_key_value_heads=2)
    path = os.path.join(adapter, "adapter_config.json")
    conf = json.load(open(path))
    for edit in ({"target_modules": None}, {"lora_alpha": -8}, {"lora_alpha": 0}, {"lora_alpha": -2.5}):
        json.dump({k: v for k, v in {**conf, **edit}.items() if k not in ("r", "lora_alpha") or k in edit},
                  open(path, "w"))
        ref = torch_logits(peft.PeftModel.from_pretrained(hf_base(base), adapter).eval(), IDS)
        assert max_diff(ref, made_ref) > 1e-3, "peft's defaults must change the scaling"
        out = tmp_path / f"out{edit['lora_alpha']}" if "lora_alpha" in edit else tmp_path / "defaults"
        out.mkdir()
        assert_peft_logits_and_export(base, adapter, ref, out)


def test_a_rank_that_a_reordered_pattern_key_picks_is_named(tmp_path):
    """peft saves pattern keys sorted: keys that match one module can then pick another rank than at creation. The
    error says so (it said "an adapter for another base model?")."""
    base, adapter, _, _ = make_adapter(str(tmp_path), seed=7, targets=["q_proj"], r=2,
                                       peft_kw=dict(rank_pattern={"layers.1.self_attn.q_proj": 6}),
                                       num_attention_heads=4, num_key_value_heads=2)
    path = os.path.join(adapter, "adapter_config.json")
    conf = json.load(open(path))
    json.dump({**conf, "rank_pattern": {"q_proj": 2, "layers.1.self_attn.q_proj": 6}}, open(path, "w"))
    with pytest.raises(UserError, match=re.escape("has rank 6, but rank_pattern key 'q_proj' (the first of 2 keys "
                                                  "that match it) gives model.layers.1.self_attn.q_proj rank 2: peft "
                                                  "saves the keys sorted")):
        cj.load(base, adapter=adapter)
    json.dump({**conf, "r": 3, "rank_pattern": {}, "alpha_pattern": {"q_proj": 4}}, open(path, "w"))
    with pytest.raises(UserError, match=re.escape("has rank 2, but the config's r gives model.layers.0.self_attn."
                                                  "q_proj rank 3 (an adapter for another base model?")):
        cj.load(base, adapter=adapter)


@pytest.mark.parametrize("field, value, words", [
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a whole number >= 1, got 0"),
    ("rank_pattern", {"q_proj": 2.5}, "must be a whole number >= 1, got 2.5"),
    ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern['q_proj'] must be a finite number"),
    ("rank_pattern", {"q_proj(": 2}, "rank_pattern key 'q_proj(' is not a valid regular expression"),
    ("alpha_pattern", [1], "alpha_pattern must be an object"),
    ("lora_alpha", "8", 'lora_alpha must be a number, got "8"'),  # float("8") took it; peft fails on it
    ("lora_alpha", None, "lora_alpha must be a number, got null"),
    ("lora_dropout", "0.1", 'lora_dropout must be a number, got "0.1"'),
    ("use_rslora", "false", 'use_rslora must be true or false, got "false"'),  # was truthy: alpha / sqrt(r)
])
def test_bad_rank_or_alpha_patterns_are_one_clear_error(mha, tmp_path, field, value, words):
    base, adapter, _, _ = mha
    edited = str(tmp_path / "bad")
    shutil.copytree(adapter, edited)
    conf = json.load(open(os.path.join(edited, "adapter_config.json")))
    json.dump({**conf, field: value}, open(os.path.join(edited, "adapter_config.json"), "w"))
    with pytest.raises(UserError, match=re.escape(words)):
        cj.load(base, adapter=edited)


def test_merges_in_the_converter_round_once_as_peft_does(tmp_path):
    """``from-hf --merge-lora --dtype bfloat16`` of an fp32 base is peft's fp32 merge cast to bf16, bit for bit
    (casting the base first rounded twice: ~1/4 of the entries were 1 ulp off); ``to-hf --dtype float32`` of a bf16
    checkpoint with LoRA keeps the fp32 sum (peft on the base loaded in fp32)."""
    base, adapter, _, _ = make_adapter(str(tmp_path / "fp32"), hidden=64, targets="all-linear", r=8, std=0.05,
                                       num_attention_heads=4, num_key_value_heads=2)
    merged = peft.PeftModel.from_pretrained(hf_base(base), adapter).merge_and_unload().to(torch.bfloat16)
    out = str(tmp_path / "merged")
    assert convert.main(["from-hf", base, out, "--peft-adapter", adapter, "--merge-lora", "--dtype", "bfloat16"]) == 0
    assert convert.main(["to-hf", out, str(tmp_path / "merged_hf")]) == 0
    got = load_file(os.path.join(tmp_path / "merged_hf", "model.safetensors"))
    for k, v in merged.state_dict().items():
        assert np.array_equal(got[k].astype(np.float32), v.float().numpy()), k
    base, adapter, ref, _ = make_adapter(str(tmp_path / "bf16"), hidden=64, targets="all-linear", r=8, std=0.05,
                                         base_dtype=torch.bfloat16, num_attention_heads=4, num_key_value_heads=2)
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert convert.main(["from-hf", base, ckpt, "--peft-adapter", adapter]) == 0
    assert convert.main(["to-hf", ckpt, back, "--dtype", "float32"]) == 0
    assert max_diff(torch_logits(hf_base(back), IDS), ref) <= 1e-4


@pytest.mark.parametrize("targets, module", [(["q_proj", "lm_head"], "lm_head"),
                                            (["embed_tokens"], "model.embed_tokens"), (["mlp"], "model.layers.0.mlp"),
                                            (["q_proj", "self_attn"], "model.layers.0.self_attn"),
                                            (["layers.1"], "model.layers.1"),
                                            (["input_layernorm"], "model.layers.0.input_layernorm"),
                                            (r".*\.1\..*", "model.layers.1.self_attn"),  # peft refuses: a block
                                            (r".*\.1\.mlp|.*q_proj", "model.layers.1.mlp"),
                                            ("lm_head|.*v_proj", "lm_head")])
def test_target_modules_naming_a_module_that_is_no_projection_is_refused(mha, tmp_path, targets, module):
    """peft would adapt the LM head / embeddings, or refuse a block or a norm (in any layer): not silently ignored
    here."""
    from cancerllm_jax.checkpoint.peft import read_adapter_config

    edited = str(tmp_path / "a")
    shutil.copytree(mha[1], edited)
    path = os.path.join(edited, "adapter_config.json")
    json.dump({**json.load(open(path)), "target_modules": targets}, open(path, "w"))
    with pytest.raises(UserError, match=f"adapt {re.escape(module)}, which is not a LoRA projection"):
        read_adapter_config(edited)


@pytest.mark.parametrize("edit, adapted, words", [
    ({"target_modules": ["c_attn"]}, None, r"target_modules \['c_attn'\] adapt none of .* in any layer"),
    ({"target_modules": ["q", "k"]}, None, "adapt none of"),  # our own short names are not peft's
    ({"target_modules": ["q_proj", "down"]}, ("q",), None),  # ... and are ignored as peft ignores them
    ({"target_modules": "ALL-LINEAR"}, ("q", "k", "v", "o", "gate", "up", "down"), None),  # peft reads any case
    ({"layers_to_transform": [0], "layers_pattern": ["layers", "[lay"]}, None, "layers_pattern '\\[lay' is not"),
    ({"layers_to_transform": [0], "layers_pattern": "(?P<idx>l)ayers"}, None, "layers_pattern .* is not a valid"),
    ({"target_modules": [1]}, None, "target_modules must be a string or a list of strings"),
    ({"target_modules": []}, None, "target_modules must be a list of module names or a regular expression"),
])
def test_adapter_target_fields_read_as_peft_reads_them(mha, tmp_path, edit, adapted, words):
    from cancerllm_jax.checkpoint.peft import read_adapter_config

    edited = str(tmp_path / "a")
    shutil.copytree(mha[1], edited)
    path = os.path.join(edited, "adapter_config.json")
    json.dump({**json.load(open(path)), **edit}, open(path, "w"))
    if words is not None:
        with pytest.raises(UserError, match=words):
            read_adapter_config(edited)
    else:
        assert read_adapter_config(edited, 2).targets == adapted
