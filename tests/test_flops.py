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
    # LoRA: forward, input and factor gradients, 2 FLOPs per weight each; but the first layer's q/k/v input
    # gradients (nothing before them trains): 2 FLOPs per base weight, and per A weight of a targeted q/k/v
    d, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    want = 4 * linear + 3 * attn_fwd + 6 * lora - 2 * d * qkv - 2 * 4 * d  # "k" is the one targeted of q/k/v
    assert lora_train_flops_per_token(cfg, seq, 4, targets) == pytest.approx(want, rel=1e-12)
    assert lora_train_flops_per_token(cfg, seq, 4, 2) == lora_train_flops_per_token(cfg, seq, 4, ("q", "k"))


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA L4", 121e12), ("NVIDIA A10G", None), ("cpu", None)])
def test_peak_flops_matches_whole_words_of_the_device_name(name, peak):
    assert peak_flops(name) == peak


@pytest.mark.parametrize("lora", [False, True])
def test_flops_match_torchs_own_flop_counter(lora):
    """Against ``torch.utils.flop_counter`` over a real forward + backward (eager attention computes every score:
    its full square is swapped for our causal count). Both match exactly: with LoRA torch skips the first layer's
    q/k/v input gradients (nothing before them trains), and so does our count."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    model = hf_model(False, None)
    model.config._attn_implementation = "eager"
    cfg = from_hf_config(model.config.to_dict())
    r, b, t = 4, 2, 12
    if lora:
        model = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids.reshape(-1)).backward()
    attn = 3 * cfg.num_layers * 2 * 2 * cfg.q_size * b
    measured = counter.get_total_flops() - attn * t * t + attn * t * (t + 1) / 2
    assert lora_train_flops_per_token(cfg, t, r if lora else None) * b * t == pytest.approx(measured)
