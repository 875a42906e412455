"""The FLOP count behind MFU, checked against an independent count: the weights of transformers' linear layers,
peft's trainable LoRA parameters, and an explicit causal sliding-window mask."""
import numpy as np
import pytest

from cancerllm_jax.config import from_hf_config
from cancerllm_jax.train.step import lora_train_flops_per_token, peak_flops


def hf_model(tie: bool, window):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                                     tie_word_embeddings=tie, max_position_embeddings=128)
    return transformers.MistralForCausalLM(cfg)


def attended_keys(seq: int, window) -> int:
    t = np.arange(seq)
    mask = t[None, :] <= t[:, None]
    if window:
        mask &= (t[:, None] - t[None, :]) < window
    return int(mask.sum())


@pytest.mark.parametrize("tie,window,seq", [(True, 5, 12), (False, None, 12), (False, 16, 9)])
def test_lora_and_full_flops_match_an_independent_count(tie, window, seq):
    import torch
    from peft import LoraConfig, get_peft_model

    model = hf_model(tie, window)
    cfg = from_hf_config(model.config.to_dict())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # + the LM head
    q_size = model.config.num_attention_heads * model.config.head_dim
    attn_fwd = model.config.num_hidden_layers * 2 * 2 * q_size * attended_keys(seq, window) / seq
    assert lora_train_flops_per_token(cfg, seq, None) == pytest.approx(6 * linear + 3 * attn_fwd, rel=1e-12)

    targets = ("k", "o", "down")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[f"{t}_proj" for t in targets]))
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # LoRA: forward, input and factor gradients, 2 FLOPs per weight each, less the first layer's unneeded backward
    # (checked against torch's own counter below): with all of q, k, v targeted, just their input gradients
    assert lora_train_flops_per_token(cfg, seq, 4, targets) <= 4 * linear + 3 * attn_fwd + 6 * lora
    full = ("q", "k", "v", "o", "gate", "up", "down")
    lora_all = sum(p.numel() for p in get_peft_model(hf_model(tie, window), LoraConfig(
        r=4, target_modules=[f"{t}_proj" for t in full])).parameters() if p.requires_grad)
    d, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    want = 4 * linear + 3 * attn_fwd + 6 * lora_all - 2 * d * qkv - 3 * 2 * 4 * d
    assert lora_train_flops_per_token(cfg, seq, 4, full) == pytest.approx(want, rel=1e-12)
    assert lora_train_flops_per_token(cfg, seq, 4, 2) == lora_train_flops_per_token(cfg, seq, 4, ("q", "k"))
    # a fine-tuning batch with a quarter of its tokens in the loss: the LM head counted for those alone
    head = cfg.hidden_size * cfg.vocab_size
    assert lora_train_flops_per_token(cfg, seq, 4, full, loss_fraction=0.25) == pytest.approx(
        want - 4 * head * 0.75, rel=1e-12)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA L4", 121e12), ("NVIDIA A10G", None), ("cpu", None),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA H200", 989e12), ("Tesla V100-SXM2-16GB", None)])
def test_peak_flops_matches_whole_words_of_the_device_name(name, peak):
    assert peak_flops(name) == peak


ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.parametrize("targets,t", [(None, 12), (ALL, 12), (ALL, 1), (("k", "o", "down"), 1), (("q",), 1),
                                       (("v", "gate"), 1), (("o", "down"), 1), (("gate", "up", "down"), 1),
                                       (("down",), 1)])
def test_flops_match_torchs_own_flop_counter(targets, t):
    """Against ``torch.utils.flop_counter`` over a real forward + backward: full fine-tuning (``None``) and LoRA on
    several target sets, where torch's autograd skips the first layer's backward products that nothing needs (which
    ones depends on the targets). Eager attention computes every score: at 12 tokens (all of q, k, v targeted, so
    every layer's attention backward runs) its full square is swapped for our causal count; at 1 token the two
    are the same, so any target set is compared as measured."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    model = hf_model(False, None)
    model.config._attn_implementation = "eager"
    cfg = from_hf_config(model.config.to_dict())
    r, b = 4, 2
    if targets:
        model = get_peft_model(model, LoraConfig(r=r, target_modules=[f"{x}_proj" for x in targets]))
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids.reshape(-1)).backward()
    attn = 3 * cfg.num_layers * 2 * 2 * cfg.q_size * b
    measured = counter.get_total_flops() - attn * t * t + attn * t * (t + 1) / 2
    ours = lora_train_flops_per_token(cfg, t, r if targets else None, targets or ALL) * b * t
    assert ours == pytest.approx(measured, rel=1e-12)
