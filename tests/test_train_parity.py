"""One LoRA training step against transformers + peft + torch.optim.AdamW, from identical weights and batch.

Our side is built from the pieces the Trainer uses (``ModelParts``, ``make_optimizer``, ``make_train_step``,
jitted); the reference is ``MistralForCausalLM`` wrapped by ``peft.get_peft_model``, the same masked mean token
cross-entropy, ``clip_grad_norm_`` and ``torch.optim.AdamW`` with the same lr / betas / eps / weight decay. fp32,
LoRA dropout 0, a tiny random config with GQA and a sliding window shorter than the sequence. B is random and
non-zero so gradients reach A as well as B.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cancerllm_jax.checkpoint.hf import read_hf  # noqa: E402
from cancerllm_jax.config import LORA_TARGETS, LoRAConfig  # noqa: E402
from cancerllm_jax.model import model_from_params  # noqa: E402
from cancerllm_jax.train.optim import OptimConfig, make_optimizer, schedule  # noqa: E402
from cancerllm_jax.train.step import ModelParts, loss_sums, make_train_step, unstack_layers  # noqa: E402

VOCAB, BATCH, SEQ, RANK, ALPHA = 97, 3, 14, 4, 8.0
HF_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             sliding_window=5, tie_word_embeddings=False)  # GQA (2 query heads per KV head), window 5 < seq 14
# clip_norm below the gradient norm, so clipping is exercised (checked below)
OPT = OptimConfig(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, warmup_ratio=0.0, schedule="constant",
                  clip_norm=0.05)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = transformers.MistralConfig(vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **HF_KW)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = str(tmp_path_factory.mktemp("hf_tiny"))
    hf.save_pretrained(folder, safe_serialization=True)
    model_cfg, base = read_hf(folder)
    assert model_cfg.sliding_window == 5 < SEQ and model_cfg.num_kv_heads < model_cfg.num_heads

    lora_cfg = LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS)
    rng = np.random.default_rng(1)
    shapes = {"q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 48), "up": (32, 48),
              "down": (48, 32)}
    lora = {"layers": {n: {"lora_a": rng.uniform(-0.3, 0.3, (2, i, RANK)).astype(np.float32),
                           "lora_b": rng.normal(0, 0.2, (2, RANK, o)).astype(np.float32)}
                       for n, (i, o) in shapes.items()}}

    stream = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1))
    mask = (rng.random((BATCH, SEQ)) > 0.2).astype(np.int32)
    batch = {"inputs": stream[:, :-1], "targets": stream[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((BATCH, SEQ)), "positions": np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}

    # transformers + peft, eager attention (the sliding window applied explicitly)
    hf.config._attn_implementation = "eager"
    pcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                           target_modules=[HF_NAMES[t].split(".")[1] for t in LORA_TARGETS])
    pm = peft.get_peft_model(hf, pcfg)
    set_peft_factors(pm, lora)
    return model_cfg, base, lora_cfg, lora, batch, pm


def lora_parts(model_cfg, base, lora_cfg, lora, remat: str = "none"):
    """``(ModelParts, trainable params, frozen base)`` as pure dicts, assembled as ``Trainer.__init__`` does (LoRA
    factors trainable, the rest frozen), fp32."""
    model = model_from_params(model_cfg, base, lora_cfg, "float32", "float32", remat, lora_params=lora)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return ModelParts(graphdef, trainable, frozen), nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def set_peft_factors(pm, lora) -> None:
    """Copy our LoRA factors (``[layers, in, r]`` / ``[layers, r, out]``) into the peft model ``pm``."""
    with torch.no_grad():
        for i, layer in enumerate(pm.base_model.model.model.layers):
            for t, path in HF_NAMES.items():
                mod = layer.get_submodule(path)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(lora["layers"][t]["lora_a"][i].T.copy()))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(lora["layers"][t]["lora_b"][i].T.copy()))


def torch_step(pm, batch):
    """Loss, LoRA grads (ours layout), pre-clip grad norm and updated LoRA weights (ours layout)."""
    pm.train()
    named = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert named and all("lora_" in n for n in named)
    opt = torch.optim.AdamW(list(named.values()), lr=OPT.lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps,
                            weight_decay=OPT.weight_decay)
    logits = pm(input_ids=torch.from_numpy(batch["inputs"].astype(np.int64))).logits
    labels = torch.from_numpy(np.where(batch["loss_mask"] > 0, batch["targets"], -100).astype(np.int64))
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1),
                                             ignore_index=-100, reduction="mean")
    opt.zero_grad()
    loss.backward()
    grads = gather(pm, lambda p: p.grad)
    norm = float(torch.nn.utils.clip_grad_norm_(list(named.values()), OPT.clip_norm))
    opt.step()
    return float(loss), grads, norm, gather(pm, lambda p: p)


def assert_matches_torch(parts, params, frozen, batch, dropout_key, ref_loss, ref_grads,
                         loss_tokens_only: bool = False) -> None:
    """Our mean loss and LoRA gradients on ``batch`` (LoRA dropout from ``dropout_key``, None: off) equal torch's:
    loss to 1e-5, every factor's gradient to 1e-4 (relative)."""
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def mean_loss(p):
        total, count = loss_sums(parts, p, frozen, jbatch, dropout_key, loss_tokens_only)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    worst = max(rel(np.asarray(grads["layers"][t][k]), ref_grads[t][k]) for t in LORA_TARGETS
                for k in ("lora_a", "lora_b"))
    assert worst <= 1e-4, f"LoRA gradients differ from torch by {worst:.2e} (relative)"


def gather(pm, get):
    out = {t: {"lora_a": [], "lora_b": []} for t in HF_NAMES}
    for layer in pm.base_model.model.model.layers:
        for t, path in HF_NAMES.items():
            mod = layer.get_submodule(path)
            out[t]["lora_a"].append(get(mod.lora_A["default"].weight).detach().numpy().T)
            out[t]["lora_b"].append(get(mod.lora_B["default"].weight).detach().numpy().T)
    return {t: {k: np.stack(v) for k, v in ab.items()} for t, ab in out.items()}


def test_one_step_matches_transformers_peft_adamw(setup):
    model_cfg, base, lora_cfg, lora, batch, pm = setup
    ref_loss, ref_grads, ref_norm, ref_new = torch_step(pm, batch)

    # ours, assembled exactly as Trainer.__init__ does (LoRAParam trainable, the rest frozen)
    parts, params, frozen_pure = lora_parts(model_cfg, base, lora_cfg, lora)
    tx = make_optimizer(OPT, total_steps=10)
    step = jax.jit(make_train_step(parts, tx, schedule(OPT, 10), grad_accum=1, use_dropout=False))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}

    def mean_loss(p):
        s, c = loss_sums(parts, p, frozen_pure, jbatch, None)
        return s / c

    grads = jax.jit(jax.grad(mean_loss))(params)
    new_state, metrics = step(state, frozen_pure, jbatch)

    loss_rel = abs(float(metrics["loss"]) - ref_loss) / abs(ref_loss)
    assert loss_rel <= 1e-5, f"loss {float(metrics['loss'])} vs torch {ref_loss} (rel {loss_rel:.2e})"
    assert ref_norm > OPT.clip_norm  # clipping was active
    norm_rel = abs(float(metrics["grad_norm"]) - ref_norm) / ref_norm
    assert norm_rel <= 1e-4, f"grad norm {float(metrics['grad_norm'])} vs torch {ref_norm}"
    worst_grad = worst_new = 0.0
    for t in LORA_TARGETS:
        for k in ("lora_a", "lora_b"):
            g = np.asarray(grads["layers"][t][k])
            assert np.abs(ref_grads[t][k]).max() > 0, f"{t}.{k}: no gradient in the reference"
            worst_grad = max(worst_grad, rel(g, ref_grads[t][k]))
            new = np.asarray(new_state["params"]["layers"][t][k])
            worst_new = max(worst_new, float(np.abs(new - ref_new[t][k]).max()))
            # the step moved the weights (by about lr per entry on the first Adam step)
            assert np.abs(new - lora["layers"][t][k]).max() > 0.5 * OPT.lr
    assert worst_grad <= 1e-4, f"LoRA gradients differ from torch by {worst_grad:.2e} (relative)"
    # The first AdamW step moves each entry by ~lr * g / (|g| + eps): an absolute bound well below lr.
    assert worst_new <= 1e-5, f"updated LoRA weights differ from torch by {worst_new:.2e}"
    print(f"\nloss rel diff {loss_rel:.2e}, grad rel diff {worst_grad:.2e}, grad-norm rel diff {norm_rel:.2e}, "
          f"updated-weight max abs diff {worst_new:.2e}")
    # the same step over per-layer frozen weights (layer_weights=per_layer, the GPU default) against torch too
    new_pl, metrics_pl = step(state, unstack_layers(jax.tree.map(jnp.copy, frozen_pure)), jbatch)
    assert abs(float(metrics_pl["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert abs(float(metrics_pl["grad_norm"]) - ref_norm) <= 1e-4 * ref_norm
    worst_pl = max(float(np.abs(np.asarray(new_pl["params"]["layers"][t][k]) - ref_new[t][k]).max())
                   for t in LORA_TARGETS for k in ("lora_a", "lora_b"))
    assert worst_pl <= 1e-5, f"per-layer step: updated LoRA weights differ from torch by {worst_pl:.2e}"


def test_lora_gradients_match_torch_past_the_attention_blocks(setup):
    """At 200 tokens the attention runs in query blocks that skip keys (``causal_attention``: after the block, and
    before the window of 5): the loss and every LoRA gradient still equal transformers + peft's."""
    from cancerllm_jax.model.mistral import causal_block_size

    model_cfg, base, lora_cfg, lora, _, pm = setup
    seq = 200
    assert causal_block_size(seq) < seq
    set_peft_factors(pm, lora)  # the factors of the fixture (another test's optimiser step may have moved them)
    rng = np.random.default_rng(11)
    stream = rng.integers(0, VOCAB, size=(2, seq + 1))
    batch = {"inputs": stream[:, :-1], "targets": stream[:, 1:], "loss_mask": rng.random((2, seq)) > 0.2,
             "segment_ids": np.ones((2, seq)), "positions": np.broadcast_to(np.arange(seq), (2, seq))}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    ref_loss, ref_grads, _, _ = torch_step(pm, batch)  # its optimiser step moves pm's factors (reset above)

    parts, params, frozen_pure = lora_parts(model_cfg, base, lora_cfg, lora)
    assert_matches_torch(parts, params, frozen_pure, batch, None, ref_loss, ref_grads)


def test_head_on_the_loss_tokens_alone_matches_torch(setup, monkeypatch):
    """Fine-tuning's loss (``loss_tokens_only``: each row's loss tokens moved to its front, the LM head run per chunk
    of 4 tokens, chunks without a loss token skipped) equals transformers + peft's full-head loss, with its LoRA
    gradients, on a row with a 9-token prompt, a row with scattered loss tokens and a row with none; so does the
    train step's, micro-batch by micro-batch."""
    import cancerllm_jax.train.step as step_mod

    model_cfg, base, lora_cfg, lora, batch, pm = setup
    monkeypatch.setattr(step_mod, "LOSS_CHUNK", 4)  # 14 tokens: chunks 0-1 run, 2-3 (the last one padded) skipped
    mask = np.zeros((BATCH, SEQ), np.int32)
    mask[0, 9:] = 1
    mask[1, [2, 6, 13]] = 1
    batch = {**batch, "loss_mask": mask}
    set_peft_factors(pm, lora)
    ref_loss, ref_grads, ref_norm, _ = torch_step(pm, batch)
    set_peft_factors(pm, lora)

    parts, params, frozen_pure = lora_parts(model_cfg, base, lora_cfg, lora)
    assert_matches_torch(parts, params, frozen_pure, batch, None, ref_loss, ref_grads, loss_tokens_only=True)
    tx = make_optimizer(OPT, total_steps=10)
    step = jax.jit(make_train_step(parts, tx, schedule(OPT, 10), grad_accum=BATCH, use_dropout=False,
                                   loss_tokens_only=True))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}
    _, metrics = step(state, frozen_pure, {k: jnp.asarray(v) for k, v in batch.items()})
    assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert abs(float(metrics["grad_norm"]) - ref_norm) <= 1e-4 * ref_norm
    assert float(metrics["tokens"]) == mask.sum()


def test_lora_dropout_gradients_match_peft_with_the_same_masks(setup):
    """LoRA dropout 0.3 on all seven projections: our loss and LoRA gradients equal transformers + peft's when peft's
    dropout modules draw our masks (the dropout's backward sits inside ``lora_delta``'s custom VJP)."""
    from cancerllm_jax.model.mistral import dropout_keep

    model_cfg, base, _, lora, batch, pm = setup
    rate, key = 0.3, jax.random.PRNGKey(5)
    set_peft_factors(pm, lora)
    salts = {"q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "up": 5, "down": 6}  # the model's per-projection fold-ins
    layer_keys = jax.random.split(key, model_cfg.num_layers)

    class SameMask(torch.nn.Module):  # nn.Dropout's arithmetic (input × mask / (1 − p)) with a given mask
        def __init__(self, keep):
            super().__init__()
            self.noise = torch.from_numpy(np.asarray(keep).astype(np.float32)) / (1 - rate)

        def forward(self, x):
            return x * self.noise

    dropped = 0.0
    saved = {}
    for i, layer in enumerate(pm.base_model.model.model.layers):
        for t, path in HF_NAMES.items():
            mod = layer.get_submodule(path)
            keep = dropout_keep((BATCH, SEQ, mod.in_features), jax.random.fold_in(layer_keys[i], salts[t]), rate)
            dropped += float(1 - np.asarray(keep).mean()) / (len(HF_NAMES) * model_cfg.num_layers)
            saved[(i, t)] = mod.lora_dropout["default"]
            mod.lora_dropout["default"] = SameMask(keep)
    try:
        ref_loss, ref_grads, _, _ = torch_step(pm, batch)
    finally:
        for (i, t), m in saved.items():
            pm.base_model.model.model.layers[i].get_submodule(HF_NAMES[t]).lora_dropout["default"] = m
        set_peft_factors(pm, lora)
    assert 0.2 < dropped < 0.4

    parts, params, frozen_pure = lora_parts(model_cfg, base, LoRAConfig(RANK, ALPHA, rate, LORA_TARGETS), lora)
    assert_matches_torch(parts, params, frozen_pure, batch, key, ref_loss, ref_grads)
    # and the masks matter: without dropout the loss differs
    plain, _, _ = lora_parts(model_cfg, base, LoRAConfig(RANK, ALPHA, 0.0, LORA_TARGETS), lora)
    total, count = loss_sums(plain, params, frozen_pure, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    assert abs(float(total / count) - ref_loss) > 1e-4 * abs(ref_loss)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_per_layer_frozen_weights_give_the_stacked_step(setup, remat):
    """The step over per-layer frozen arrays (``unstack_layers``: a Python loop, no per-layer weight slices) is the
    scan's step: the same gradients, loss and gradient norm, with dropout on, gradient accumulation and remat."""
    model_cfg, base, _, lora, batch, _ = setup
    lora_cfg = LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.3, targets=LORA_TARGETS)
    parts, params, frozen_pure = lora_parts(model_cfg, base, lora_cfg, lora, remat)
    per_layer = unstack_layers(jax.tree.map(jnp.copy, frozen_pure))
    assert isinstance(per_layer["layers"], list) and len(per_layer["layers"]) == model_cfg.num_layers
    assert np.array_equal(per_layer["layers"][1]["q"]["kernel"], frozen_pure["layers"]["q"]["kernel"][1])
    tx = make_optimizer(OPT, total_steps=10)
    step = jax.jit(make_train_step(parts, tx, schedule(OPT, 10), grad_accum=BATCH, use_dropout=True))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.PRNGKey(7)
    grads = [jax.jit(jax.grad(lambda p, f: loss_sums(parts, p, f, jbatch, key)[0]))(params, fz)
             for fz in (frozen_pure, per_layer)]
    for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        scale = np.abs(np.asarray(g0)).max()
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-5 * scale)
    metrics = []
    for fz in (frozen_pure, per_layer):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.PRNGKey(0)}
        for _ in range(2):
            state, m = step(state, fz, jbatch)
        metrics.append(m)
    m0, m1 = metrics
    assert abs(float(m0["loss"]) - float(m1["loss"])) <= 1e-6 * abs(float(m0["loss"]))
    assert abs(float(m0["grad_norm"]) - float(m1["grad_norm"])) <= 1e-5 * float(m0["grad_norm"])


def test_lora_dropout_rate_scale_and_independence():
    """PEFT's dropout on the LoRA input: drop rate within sampling error, the two 16-bit halves of a threefry word
    independent; kept values scaled by 1/(1-p) inside ``lora_delta``."""
    from cancerllm_jax.model.mistral import dropout_keep, lora_delta

    for rate in (0.05, 0.1, 0.5):
        keep = np.asarray(dropout_keep((1000, 1000), jax.random.PRNGKey(3), rate))
        dropped = float((~keep).mean())
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / keep.size), (rate, dropped)
    # the two 16-bit halves of one 32-bit word (neighbours on the last axis) are dropped independently
    y = ~np.asarray(dropout_keep((1000, 1000), jax.random.PRNGKey(4), 0.5)).reshape(-1, 2)
    both = float((y[:, 0] & y[:, 1]).mean())
    assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / len(y)), both
    odd = np.asarray(dropout_keep((3, 7, 999), jax.random.PRNGKey(5), 0.3))  # odd last axis
    assert odd.shape == (3, 7, 999) and abs(float((~odd).mean()) - 0.3) < 0.01
    a = np.asarray(dropout_keep((1000, 1000), jax.random.PRNGKey(1), 0.1))
    b = np.asarray(dropout_keep((1000, 1000), jax.random.PRNGKey(2), 0.1))
    assert (a != b).mean() > 0.1  # different keys, different masks
    # the branch sees x · 1/(1 - p) where kept and 0 where dropped, cast to the factors' dtype first (PEFT's order:
    # a bf16 input is dropped in fp32) and scaled as torch's dropout scales: with A = I and B = I, the output is
    # exactly torch's dropout of the fp32 input under the same mask
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.PRNGKey(6), (2, 50, 64)).astype(dtype)
        keep = dropout_keep(x.shape, jax.random.PRNGKey(7), 0.3)
        eye = jnp.eye(64)
        out = np.asarray(lora_delta(x, eye, eye, 1.0, keep, 0.3))
        noise = torch.from_numpy(np.asarray(keep).astype(np.float32)) / (1 - 0.3)  # nn.Dropout's arithmetic
        ref = (torch.from_numpy(np.asarray(x.astype(jnp.float32))) * noise).numpy()
        np.testing.assert_array_equal(out, ref, err_msg=str(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_matches_torch(dtype):
    """``swiglu`` (a custom VJP that recomputes the sigmoid) vs torch's ``silu(gate) * up``: output and both input
    gradients, fp32 to 1e-6 relative, bf16 to one rounding of a value (torch's CPU bf16 silu runs in fp32 too)."""
    from cancerllm_jax.model.mistral import swiglu

    rng = np.random.default_rng(0)
    gate, up, ct = (rng.normal(0, s, (64, 257)).astype(np.float32) for s in (3.0, 1.0, 1.0))
    jd, td = getattr(jnp, dtype), getattr(torch, dtype)
    out, vjp = jax.vjp(swiglu, *(jnp.asarray(a).astype(jd) for a in (gate, up)))
    ours = (out, *vjp(jnp.asarray(ct).astype(jd)))
    tg, tu = (torch.tensor(a).to(td).requires_grad_() for a in (gate, up))
    ref_out = torch.nn.functional.silu(tg) * tu
    ref_out.backward(torch.tensor(ct).to(td))
    for name, a, b in zip(("output", "d_gate", "d_up"), ours, (ref_out, tg.grad, tu.grad)):
        a, b = np.asarray(a.astype(jnp.float32)), b.detach().float().numpy()
        if dtype == "float32":
            assert rel(a, b) <= 1e-6, (name, rel(a, b))
        else:  # torch's rounding order (silu rounded, then the product): all but a stray ulp bit-equal
            np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-30, err_msg=name)
            assert (a != b).mean() <= 1e-3, (name, float((a != b).mean()))


@pytest.mark.parametrize("sched", ["cosine", "linear"])
def test_several_steps_with_warmup_and_grad_accum_match_hf(setup, sched):
    """Five optimiser steps of 2 micro-batches each against torch AdamW + HF's ``get_*_schedule_with_warmup``
    (LambdaLR stepped after each optimiser step) and HF Trainer's accumulation: every micro-batch's token-loss
    sum over the whole batch's token count. The micro-batches hold very different numbers of target tokens."""
    import copy

    model_cfg, base, lora_cfg, lora, _, pm = setup
    steps, accum = 5, 2
    opt = OptimConfig(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, warmup_ratio=0.3, schedule=sched,
                      clip_norm=0.05, grad_accum=accum)
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(steps):
        stream = rng.integers(0, VOCAB, size=(2 * accum, SEQ + 1))
        mask = np.zeros((2 * accum, SEQ), np.int32)
        mask[0::accum, :] = 1  # micro-batch 0 (rows 0, 2): every token; micro-batch 1 (rows 1, 3): 3 tokens
        mask[1, -2:] = mask[3, -1:] = 1
        batches.append({"inputs": stream[:, :-1], "targets": stream[:, 1:], "loss_mask": mask,
                        "segment_ids": np.ones((2 * accum, SEQ)),
                        "positions": np.broadcast_to(np.arange(SEQ), (2 * accum, SEQ))})
        batches[-1] = {k: np.asarray(v, np.int32) for k, v in batches[-1].items()}

    ref = copy.deepcopy(pm)
    set_peft_factors(ref, lora)
    ref.train()
    named = [p for p in ref.parameters() if p.requires_grad]
    topt = torch.optim.AdamW(named, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay)
    make = getattr(transformers, f"get_{sched}_schedule_with_warmup")
    warm = math.ceil(opt.warmup_ratio * steps)  # TrainingArguments.get_warmup_steps
    lr_sched = make(topt, num_warmup_steps=warm, num_training_steps=steps)
    ref_rows = []
    for b in batches:
        topt.zero_grad()
        labels = np.where(b["loss_mask"] > 0, b["targets"], -100)
        total = int((labels != -100).sum())
        loss_sum = 0.0
        for i in range(accum):  # micro-batch i: rows i, i + accum, ... (as make_train_step splits)
            logits = ref(input_ids=torch.from_numpy(b["inputs"][i::accum].astype(np.int64))).logits
            mb = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB),
                                                   torch.from_numpy(labels[i::accum].astype(np.int64)).reshape(-1),
                                                   ignore_index=-100, reduction="sum") / total
            mb.backward()
            loss_sum += float(mb.detach())
        lr = topt.param_groups[0]["lr"]
        norm = float(torch.nn.utils.clip_grad_norm_(named, opt.clip_norm))
        topt.step()
        lr_sched.step()
        ref_rows.append((loss_sum, norm, lr))
    ref_new = gather(ref, lambda p: p)

    parts, params, frozen_pure = lora_parts(model_cfg, base, lora_cfg, lora)
    tx = make_optimizer(opt, total_steps=steps)
    step = jax.jit(make_train_step(parts, tx, schedule(opt, steps), grad_accum=accum, use_dropout=False))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}
    for b, (ref_loss, ref_norm, ref_lr) in zip(batches, ref_rows):
        state, m = step(state, frozen_pure, {k: jnp.asarray(v) for k, v in b.items()})
        assert abs(float(m["lr"]) - ref_lr) <= 1e-9, (float(m["lr"]), ref_lr)
        assert abs(float(m["loss"]) - ref_loss) <= 1e-5 * ref_loss, (float(m["loss"]), ref_loss)
        assert abs(float(m["grad_norm"]) - ref_norm) <= 1e-4 * ref_norm, (float(m["grad_norm"]), ref_norm)
    assert ref_rows[0][2] == 0.0 and max(r[1] for r in ref_rows) > opt.clip_norm  # warm-up from 0; clipping
    worst = max(float(np.abs(np.asarray(state["params"]["layers"][t][k]) - ref_new[t][k]).max())
                for t in LORA_TARGETS for k in ("lora_a", "lora_b"))
    assert worst <= 1e-5, f"LoRA weights after {steps} steps differ from torch by {worst:.2e}"


def test_schedules_adamw_decay_mask_and_clipping_match_torch():
    """Every step's lr against HF's ``get_*_schedule_with_warmup`` (no warm-up, warm-up of every step, 1-step runs),
    then AdamW + clipping on a tree with norm weights (no decay, as HF Trainer's groups) against torch."""
    from cancerllm_jax.train.optim import warmup_steps

    p = torch.nn.Parameter(torch.zeros(1))
    for sched, total, ratio in [(s, t, r) for s in ("cosine", "linear", "constant") for t in (1, 2, 7)
                                for r in (0.0, 0.2, 0.99)]:
        opt = OptimConfig(lr=3.0, schedule=sched, warmup_ratio=ratio)
        sgd = torch.optim.SGD([p], lr=opt.lr)
        warm = warmup_steps(opt, total)
        make = getattr(transformers, f"get_{sched}_schedule_with_warmup")
        ref = make(sgd, warm) if sched == "constant" else make(sgd, warm, total)
        ours = schedule(opt, total)
        for step in range(total):
            assert abs(float(ours(step)) - sgd.param_groups[0]["lr"]) < 1e-6, (sched, total, ratio, step)
            sgd.step()
            ref.step()

    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(7, 4)), "final_norm": rng.normal(size=(4,)),
              "layers": {"attn_norm": rng.normal(size=(2, 4)), "q": {"kernel": rng.normal(size=(2, 4, 6))}}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    opt = OptimConfig(lr=1e-2, weight_decay=0.5, warmup_ratio=0.3, schedule="cosine", clip_norm=0.5)
    tx = make_optimizer(opt, 5)
    ours, state = params, tx.init(params)
    named = [(jax.tree_util.keystr(k), torch.nn.Parameter(torch.from_numpy(v.copy())))
             for k, v in jax.tree_util.tree_flatten_with_path(params)[0]]
    topt = torch.optim.AdamW([{"params": [t for n, t in named if "norm" not in n], "weight_decay": opt.weight_decay},
                              {"params": [t for n, t in named if "norm" in n], "weight_decay": 0.0}],
                             lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
    lr_sched = transformers.get_cosine_schedule_with_warmup(topt, warmup_steps(opt, 5), 5)
    for _ in range(5):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        updates, state = jax.jit(tx.update)(grads, state, ours)
        ours = jax.tree.map(lambda a, u: a + u, ours, updates)
        for (_, t), g in zip(named, jax.tree.leaves(grads)):
            t.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_([t for _, t in named], opt.clip_norm)
        topt.step()
        lr_sched.step()
    for (name, t), a in zip(named, jax.tree.leaves(ours)):
        np.testing.assert_allclose(np.asarray(a), t.detach().numpy(), atol=2e-6, err_msg=name)


@pytest.mark.parametrize("loss_tokens_only", [False, True])
def test_full_fine_tuning_step_matches_transformers_adamw(tmp_path, monkeypatch, loss_tokens_only):
    """``--full``: one step of every weight against transformers + torch AdamW (norms undecayed, as HF Trainer),
    on a tied Llama with one KV head whose pad id is an input: nn.Embedding(padding_idx) gives the pad row no
    gradient from the lookup (it used to get one: that row was 0.08 off after the step). ``loss_tokens_only`` (as
    fine-tuning runs) on a loss mask with prompts (labels -100 on torch's side): a trained head keeps the
    whole-batch head, so its gradient (here the tied embedding's) is taken."""
    import cancerllm_jax.train.step as step_mod

    monkeypatch.setattr(step_mod, "LOSS_CHUNK", 4)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=12, pad_token_id=3,
                                   tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        hf.model.embed_tokens.weight[3].normal_(0, 0.1)  # padding_idx zeroed it at init; a real model's is not
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    model_cfg, base = read_hf(str(tmp_path))
    rng = np.random.default_rng(2)
    stream = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1))
    stream[:, 4] = 3  # the pad id as an input (a packed document's end)
    mask = np.ones((BATCH, SEQ))
    if loss_tokens_only:
        mask[:, :5] = 0
        mask[1, 7:11] = 0
    batch = {"inputs": stream[:, :-1], "targets": stream[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((BATCH, SEQ)), "positions": np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}

    hf.config._attn_implementation = "eager"
    hf.train()
    decay = [p for n, p in hf.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in hf.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPT.lr, betas=(OPT.b1, OPT.b2),
                            eps=OPT.eps)
    logits = hf(input_ids=torch.from_numpy(batch["inputs"].astype(np.int64))).logits
    labels = np.where(mask > 0, batch["targets"], -100).astype(np.int64)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(labels).reshape(-1))
    loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(hf.parameters()), OPT.clip_norm))
    opt.step()
    ref = {n: p.detach().numpy() for n, p in hf.named_parameters()}

    model = model_from_params(model_cfg, base, None, "float32", "float32", "none")
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    parts = ModelParts(graphdef, trainable, frozen)
    params, frozen_pure = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    tx = make_optimizer(OPT, total_steps=10)
    step = jax.jit(make_train_step(parts, tx, schedule(OPT, 10), grad_accum=1, use_dropout=False,
                                   loss_tokens_only=loss_tokens_only))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}
    new_state, metrics = step(state, frozen_pure, {k: jnp.asarray(v) for k, v in batch.items()})
    assert abs(float(metrics["loss"]) - loss.item()) <= 1e-5 * loss.item()
    assert abs(float(metrics["grad_norm"]) - ref_norm) <= 1e-4 * ref_norm and ref_norm > OPT.clip_norm
    new = new_state["params"]
    embed = np.asarray(new["embed"])
    assert np.abs(embed - ref["model.embed_tokens.weight"]).max() <= 1e-5  # the pad row included
    q = np.asarray(new["layers"]["q"]["kernel"])  # [layers, in, out] = torch's weight transposed
    # Adam's first step is lr * g / (|g| + eps): entries whose gradient is near eps move by fp32 noise, ~1e-3 lr
    assert np.abs(q[1] - ref["model.layers.1.self_attn.q_proj.weight"].T).max() <= 1e-2 * OPT.lr
    # norms are not decayed (HF Trainer's rule)
    assert np.abs(np.asarray(new["layers"]["attn_norm"])[0] - ref["model.layers.0.input_layernorm.weight"]).max() \
        <= 1e-2 * OPT.lr
    assert np.abs(np.asarray(new["final_norm"]) - ref["model.norm.weight"]).max() <= 1e-2 * OPT.lr
