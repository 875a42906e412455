"""The train step: one pure function ``(state, frozen, batch) -> (state, metrics)``, jitted with shardings.

``state`` holds only what training changes (trainable params, optimiser state, step, rng); the frozen base is
a separate, undonated argument. Loss = mean token cross-entropy over unmasked targets of the whole global batch
(gradient accumulation included).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


class ModelParts:
    """How to rebuild the NNX model inside a jitted function from pure ``trainable`` and ``frozen`` dicts."""

    def __init__(self, graphdef, trainable_template, frozen_template):
        self.graphdef, self.trainable_template, self.frozen_template = graphdef, trainable_template, frozen_template

    def merge(self, trainable: dict, frozen: dict):
        states = []
        for template, pure in ((self.trainable_template, trainable), (self.frozen_template, frozen)):
            state = jax.tree.map(lambda x: x, template)
            nnx.replace_by_pure_dict(state, pure)
            states.append(state)
        return nnx.merge(self.graphdef, *states)


def loss_sums(parts: ModelParts, trainable, frozen, batch: dict, dropout_key) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, number of masked tokens)`` for one (micro)batch."""
    model = parts.merge(trainable, frozen)
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_losses(logits, batch["targets"]) * mask), jnp.sum(mask)


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, schedule: Callable, grad_accum: int = 1,
                    use_dropout: bool = True) -> Callable:
    """Build the pure step. ``state = {"params", "opt_state", "step", "rng"}``."""

    def step(state: dict[str, Any], frozen, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(
            lambda p, b, k: loss_sums(parts, p, frozen, b, k if use_dropout else None), has_aux=True)

        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state["params"], batch, key)
        else:
            # micro-batch i takes rows i, i+A, i+2A… so every micro-batch stays spread over the data axis
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
                                 .swapaxes(0, 1), batch)

            def acc(carry, xs):
                mb, i = xs
                (ls, c), g = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (ls, c, g)), None

            zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss_sum, count, grads), _ = jax.lax.scan(acc, zero, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state["step"]), "tokens": count}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return step


def make_eval_step(parts: ModelParts) -> Callable:
    def eval_step(params, frozen, batch):
        return loss_sums(parts, params, frozen, batch, None)

    return eval_step


def lora_train_flops_per_token(cfg, seq_len: int, lora_rank: int | None, n_lora_targets: int = 7) -> float:
    """Honest training FLOPs per token: forward 2N, input-gradients 2N, weight-gradients only for trainable weights.

    ``lora_rank=None`` means full fine-tuning (6N). Attention score/value matmuls are added (causal, full).
    """
    d, layers = cfg.hidden_size, cfg.num_layers
    n_matmul = layers * (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * cfg.intermediate_size)
    n_head = d * cfg.vocab_size
    n = n_matmul + n_head
    window = min(seq_len, cfg.sliding_window or seq_len)
    attn = layers * 2 * 2 * cfg.q_size * window / 2  # QK^T and PV, forward, causal half
    if lora_rank is None:
        return 6 * n + 3 * attn
    lora = layers * n_lora_targets * 2 * lora_rank * (d + d)  # approximate A and B per target
    return 4 * n + 3 * attn + 6 * lora


PEAK_FLOPS = {  # dense bf16, per device
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12,
}


def device_peak_flops() -> float | None:
    """Peak bf16 FLOP/s of device 0 when known (GPU names), else None (CPU)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
