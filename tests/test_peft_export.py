"""LoRA export: PEFT adapters that ``peft`` loads onto the HF base, merged exports, and PEFT-exact forwards."""
from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from cancerllm_jax.api import LoadedWeights
from cancerllm_jax.checkpoint.hf import read_hf
from cancerllm_jax.checkpoint.peft import read_peft_adapter, write_peft_adapter
from cancerllm_jax.config import LoRAConfig
from cancerllm_jax.errors import UserError
from cancerllm_jax.model import model_from_params
from cancerllm_jax.model.lora import merge_lora_params
from cancerllm_jax.model.mistral import proj_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 53
LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets="all")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert = _load_tool("convert_checkpoint")


def random_lora(cfg, lora: LoRAConfig, seed: int = 0) -> dict:
    """Non-zero A and B for every target (PEFT would start B at zero, which would test nothing)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (d_in, d_out) in proj_shapes(cfg).items():
        if name in lora.targets:
            out[name] = {"lora_a": rng.normal(0, 0.2, (cfg.num_layers, d_in, lora.rank)).astype(np.float32),
                         "lora_b": rng.normal(0, 0.2, (cfg.num_layers, lora.rank, d_out)).astype(np.float32)}
    return {"layers": out}


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    logits, _ = model(jnp.asarray(ids, jnp.int32))
    return np.asarray(logits, np.float32)


def hf_base(folder: str):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GQA Mistral saved as an HF folder, its (cfg, params), and input ids longer than the window."""
    torch.manual_seed(0)
    hf_cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                        max_position_embeddings=128, initializer_range=0.1)
    folder = str(tmp_path_factory.mktemp("base"))
    transformers.MistralForCausalLM(hf_cfg).save_pretrained(folder, safe_serialization=True)
    cfg, params = read_hf(folder)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 15))
    return folder, cfg, params, ids


@pytest.fixture(scope="module")
def tuned(base):
    """Our model with random LoRA on every projection, and its logits."""
    _, cfg, params, ids = base
    lp = random_lora(cfg, LORA)
    model = model_from_params(cfg, params, lora=LORA, lora_params=lp)
    return lp, our_logits(model, ids)


def fake_run(base, lp, monkeypatch):
    """Make ``api.read_weights`` return a LoRA run (training runs are another module's job)."""
    _, cfg, params, _ = base
    w = LoadedWeights(cfg, params, lora=LORA, lora_params=lp, tokenizer_spec=None, source="run")
    monkeypatch.setattr(convert.api, "read_weights", lambda path, dtype=None: w)


def test_peft_adapter_loads_in_peft_with_our_logits(base, tuned, tmp_path, monkeypatch):
    folder, cfg, _, ids = base
    lp, ours = tuned
    fake_run(base, lp, monkeypatch)
    out = str(tmp_path / "adapter")
    assert convert.main(["to-hf", "run", out, "--peft-adapter", "--base-name", folder]) == 0
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == folder
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(weights) == 2 * 7 * cfg.num_layers
    model = peft.PeftModel.from_pretrained(hf_base(folder), out).eval()
    ref = torch_logits(model, ids)
    base_only = torch_logits(hf_base(folder), ids)
    assert float(np.abs(ref - base_only).max()) > 1e-2, "the adapter must change the logits"
    assert float(np.abs(ours - ref).max()) <= 1e-4


def test_adapter_on_a_run_base_says_how_to_export_the_base_for_peft(base, tuned, tmp_path, monkeypatch, capsys):
    """A LoRA run tuned from a training run (a --full pretraining run): peft cannot read that base; the export says
    how to make one it can (it said nothing, and peft failed with 'Unrecognized model')."""
    from cancerllm_jax.train.run_io import RUN_FILE

    lp, _ = tuned
    fake_run(base, lp, monkeypatch)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / RUN_FILE).write_text("{}")
    monkeypatch.setattr(convert, "_base_of", lambda ckpt_dir, w: str(stage1))
    assert convert.main(["to-hf", "run", str(tmp_path / "a"), "--peft-adapter"]) == 0
    assert f"the adapter's base is the training run {stage1}" in capsys.readouterr().err
    assert convert.main(["to-hf", "run", str(tmp_path / "b"), "--peft-adapter", "--base-name", base[0]]) == 0
    assert "peft cannot read" not in capsys.readouterr().err


def test_merged_export_loads_in_transformers(base, tuned, tmp_path, monkeypatch):
    ids = base[3]
    lp, ours = tuned
    fake_run(base, lp, monkeypatch)
    for flags in ([], ["--merge-lora"]):  # merged is the default for a run with LoRA
        out = str(tmp_path / f"merged{len(flags)}")
        assert convert.main(["to-hf", "run", out, *flags]) == 0
        assert not os.path.exists(os.path.join(out, "adapter_config.json"))
        assert float(np.abs(torch_logits(hf_base(out), ids) - ours).max()) <= 1e-4


def test_merge_lora_params_equals_unmerged_forward(base, tuned):
    _, cfg, params, ids = base
    lp, ours = tuned
    merged = model_from_params(cfg, merge_lora_params(params, lp, LORA))
    assert float(np.abs(our_logits(merged, ids) - ours).max()) <= 1e-5


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]])
def test_our_lora_forward_equals_peft(base, targets, tmp_path):
    """peft's get_peft_model with random factors, saved by peft, read by us: same logits."""
    folder, cfg, params, ids = base
    torch.manual_seed(3)
    pconf = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    pmodel = peft.get_peft_model(hf_base(folder), pconf).eval()
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    ref = torch_logits(pmodel, ids)
    pmodel.save_pretrained(str(tmp_path / "p"))
    lora, lp = read_peft_adapter(str(tmp_path / "p"), cfg)
    assert set(lora.targets) == {t.split("_")[0] for t in targets} and lora.scaling == 2.0
    ours = our_logits(model_from_params(cfg, params, lora=lora, lora_params=lp), ids)
    assert float(np.abs(ours - ref).max()) <= 1e-4
    # and back out again: our export of what we read is the same tensors peft wrote
    write_peft_adapter(str(tmp_path / "again"), cfg, lora, lp, folder)
    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_adapter_missing_or_unexpected_keys_are_errors(base, tuned, tmp_path):
    folder, cfg, _, _ = base
    lp, _ = tuned
    out = str(tmp_path / "a")
    write_peft_adapter(out, cfg, LORA, lp, folder)
    path = os.path.join(out, "adapter_model.safetensors")
    good = load_file(path)
    missing = dict(good)
    missing.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    save_file(missing, path)
    with pytest.raises(UserError, match="up_proj.lora_B.weight is missing"):
        read_peft_adapter(out, cfg)
    save_file({**good, "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": np.zeros((4, 32),
                                                                                                  np.float32)}, path)
    with pytest.raises(UserError, match="unexpected"):
        read_peft_adapter(out, cfg)
    with pytest.raises(UserError, match="missing"):
        write_peft_adapter(str(tmp_path / "b"), cfg, LORA, {"layers": {"q": lp["layers"]["q"]}}, folder)
    with pytest.raises(UserError, match="not empty"):
        write_peft_adapter(out, cfg, LORA, lp, folder)


@pytest.mark.parametrize("field, value", [("alora_invocation_tokens", [10, 11]), ("init_lora_weights", "pissa"),
                                          ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"),
                                          ("init_lora_weights", "loftq"), ("arrow_config", {"top_k": 3}),
                                          ("use_qalora", True),
                                          ("some_future_variant", {"on": True})])
def test_adapters_that_are_more_than_their_factors_are_refused(base, tuned, tmp_path, field, value):
    """aLoRA acts only after its invocation tokens; PiSSA / OLoRA / LoftQ rewrite the base weights when peft loads
    them; Arrow routes between adapters; a rank pattern gives modules other ranks: read as plain factors they would
    give other logits than peft, so they are errors, and so is any field this reader does not know that is set."""
    folder, cfg, _, _ = base
    lp, _ = tuned
    out = str(tmp_path / "a")
    write_peft_adapter(out, cfg, LORA, lp, folder)
    path = os.path.join(out, "adapter_config.json")
    conf = json.load(open(path))
    json.dump({**conf, field: value}, open(path, "w"))
    with pytest.raises(UserError, match=field):
        read_peft_adapter(out, cfg)
    json.dump({**conf, "init_lora_weights": "gaussian"}, open(path, "w"))
    read_peft_adapter(out, cfg)  # a plain initialisation name is fine


@pytest.mark.parametrize("value", [4.5, "4", True, None])
def test_a_rank_that_is_no_whole_number_is_refused(base, tuned, tmp_path, value):
    """``r: 4.5`` (peft cannot build it) was read as rank 4, silently: this adapter's factors have rank 4."""
    folder, cfg, _, _ = base
    out = str(tmp_path / "a")
    write_peft_adapter(out, cfg, LORA, tuned[0], folder)
    path = os.path.join(out, "adapter_config.json")
    json.dump({**json.load(open(path)), "r": value}, open(path, "w"))
    with pytest.raises(UserError, match="adapter_config.json: r must be a whole number"):
        read_peft_adapter(out, cfg)


@pytest.mark.parametrize("field, value", [("r", 0), ("lora_dropout", 1.5)])  # lora_alpha <= 0 loads, as in peft
def test_an_out_of_range_adapter_value_names_the_adapter_config(base, tuned, tmp_path, field, value):
    folder, cfg, _, _ = base
    out = str(tmp_path / "a")
    write_peft_adapter(out, cfg, LORA, tuned[0], folder)
    path = os.path.join(out, "adapter_config.json")
    json.dump({**json.load(open(path)), field: value}, open(path, "w"))
    with pytest.raises(UserError, match="adapter_config.json: lora"):
        read_peft_adapter(out, cfg)


def test_peft_all_linear_is_every_projection():
    """``lora.targets=all-linear`` (peft's name: every linear layer but the LM head) was refused as an unknown module;
    it is our ``all``."""
    assert LoRAConfig(targets="all-linear").targets == LoRAConfig(targets="all").targets == LORA.targets
    assert len(LORA.targets) == 7
