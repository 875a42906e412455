"""Training FLOPs counted honestly (forward, input gradients, trainable weights' gradients) and the devices' peak
FLOP/s an MFU is measured against. No jax here: the benchmarks' torch side imports it too."""
from __future__ import annotations

import re
from typing import Sequence

from cancerllm_jax.config import LORA_TARGETS, proj_shapes


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """How many keys a query attends to on average in a causal block of ``seq_len`` tokens with a sliding
    ``window`` (query ``t`` sees ``min(t + 1, window)`` keys)."""
    w = min(seq_len, window or seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def lora_train_flops_per_token(cfg, seq_len: int, lora_rank: int | None,
                               targets: Sequence[str] | int = LORA_TARGETS, loss_fraction: float = 1.0) -> float:
    """Honest training FLOPs per token: forward 2N, input gradients 2N, weight gradients only for trainable weights.

    N counts the layers' projections and the LM head (a tied head too: it is a matmul); the embedding lookup is no
    matmul. ``lora_rank=None`` means full fine-tuning (6N). LoRA adds, per factor pair of a ``targets`` projection
    ``[in, out]``, ``2r(in + out)`` forward, as much for the input gradient and for the factors' own gradients.
    Attention's score and value products are counted over the keys each query really attends to (causal, inside
    the sliding window), forward 1×, backward 2×. With LoRA the first layer's backward products that nothing needs
    are left out (``_first_layer_unneeded``: its q/k/v input gradients, and more when q, k or v are not targeted),
    as torch skips them; the count then equals torch's own FLOP counter. ``targets`` may be a count (the first n
    of q, k, v, o, gate, up, down). ``loss_fraction``: the share of tokens in the loss (a fine-tuning batch's
    responses), the only ones whose LM head the loss needs: the head is counted for those alone."""
    shapes = proj_shapes(cfg)
    if isinstance(targets, int):
        targets = LORA_TARGETS[:targets]
    layers = cfg.num_layers
    n = layers * sum(i * o for i, o in shapes.values()) + loss_fraction * cfg.hidden_size * cfg.vocab_size
    attn = layers * 2 * 2 * cfg.q_size * mean_keys_per_query(seq_len, cfg.sliding_window)  # QK^T and PV, forward
    if lora_rank is None:
        return 6 * n + 3 * attn
    lora_forward = layers * sum(2 * lora_rank * sum(shapes[t]) for t in targets)
    keys = mean_keys_per_query(seq_len, cfg.sliding_window)
    return 4 * n + 3 * attn + 3 * lora_forward - _first_layer_unneeded(cfg, lora_rank, targets, keys)


def _first_layer_unneeded(cfg, rank: int, targets: Sequence[str], keys: float) -> float:
    """Per-token FLOPs of the first layer's backward that a LoRA step never needs (torch's autograd skips them): the
    embedding is frozen, so an input gradient there is needed only behind something trainable in that layer."""
    shapes, t = proj_shapes(cfg), set(targets)

    def inputs(name: str, needed: bool) -> float:  # a projection's input gradient, base and LoRA A, if not needed
        d_in, d_out = shapes[name]
        return 0 if needed else 2 * d_in * d_out + (2 * rank * d_in if name in t else 0)

    q, k, v = "q" in t, "k" in t, "v" in t
    product = 2 * cfg.q_size * keys  # one of attention's four backward products: dP, dV, dQ, dK
    unneeded = inputs("q", False) + inputs("k", False) + inputs("v", False)
    unneeded += product * ((not (q or k)) + (not v) + (not q) + (not k))
    attention_out = q or k or v  # what needs a gradient from here on
    unneeded += inputs("o", attention_out)
    residual = attention_out or "o" in t
    unneeded += inputs("gate", residual) + inputs("up", residual)
    unneeded += inputs("down", residual or "gate" in t or "up" in t)
    return unneeded


# Dense bf16 peak FLOP/s per device, by the words of the device name (the most specific match wins).
# dense bf16 tensor-core peaks (the datasheets' sparse figures halved); NVL cards run at lower clocks. No V100: it has
# no bf16 tensor cores (its 125 TFLOPS are fp16)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
              "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a device named ``device_name`` (``NVIDIA H100 80GB HBM3``, ``NVIDIA A100-SXM4-80GB``), or
    None when unknown: every word of a ``PEAK_FLOPS`` key must be a word of the name, so an L40S is no L4."""
    words = set(re.split(r"[^0-9a-z]+", device_name.lower()))
    known = [k for k in PEAK_FLOPS if set(k.lower().split()) <= words]
    return PEAK_FLOPS[max(known, key=lambda k: len(k.split()))] if known else None


def mfu_peak(device_name: str, dtype: str) -> float | None:
    """The peak FLOP/s an MFU of a ``dtype`` run is measured against: the device's dense bf16 peak for a bfloat16
    run; None (no MFU) for float32, whose peak (fp32 or TF32) the table does not hold."""
    return peak_flops(device_name) if dtype == "bfloat16" else None
