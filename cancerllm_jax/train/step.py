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

from cancerllm_jax.flops import (PEAK_FLOPS, lora_train_flops_per_token, mean_keys_per_query,  # noqa: F401  (their
                                 mfu_peak, peak_flops)  # home was here; imported from here too)
from cancerllm_jax.model.mistral import full_fp32_dots

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
LOSS_CHUNK = 64  # tokens per row in each LM-head chunk of ``masked_head_loss`` (2-core CPU: 32 as fast, 128 slower)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


class ModelParts:
    """How to rebuild the NNX model inside a jitted function from pure ``trainable`` and ``frozen`` dicts."""

    def __init__(self, graphdef, trainable_template, frozen_template):
        # shapes only: a template holding the arrays would keep a second reference to the whole base alive
        def shapes(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)

        self.graphdef = graphdef
        self.trainable_template, self.frozen_template = shapes(trainable_template), shapes(frozen_template)

    def merge(self, trainable: dict, frozen: dict):
        states = []
        for template, pure in ((self.trainable_template, trainable), (self.frozen_template, frozen)):
            state = jax.tree.map(lambda x: x, template)
            nnx.replace_by_pure_dict(state, pure)
            states.append(state)
        return nnx.merge(self.graphdef, *states)

    def model_and_layers(self, trainable: dict, frozen: dict):
        """``(model, per-layer weights or None)``. With ``frozen["layers"]`` a list (:func:`unstack_layers`) the
        layers run as a Python loop over those arrays, each with its LoRA factors sliced from the stacked ones (a
        few MB); the stacked slots the model's state still has get zeros that nothing reads (XLA drops them)."""
        per_layer = frozen.get("layers")
        if not isinstance(per_layer, list):
            return self.merge(trainable, frozen), None
        stacked = nnx.to_pure_dict(self.frozen_template)["layers"]
        stub = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stacked)
        model = self.merge(trainable, {**frozen, "layers": stub})
        mine = trainable.get("layers", {})
        layers = [_merged(jax.tree.map(lambda a, i=i: a[i], mine), w) for i, w in enumerate(per_layer)]
        return model, layers


def _merged(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves as one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unstack_layers(frozen: dict, shardings: list | None = None, consume: bool = False) -> dict:
    """``frozen`` with its stacked ``layers`` weights as one dict of arrays per layer (``shardings``: one tree of
    shardings per layer), for a train step that runs the layers as a Python loop: the scan over stacked weights
    makes XLA copy each layer's slice before its GEMM, forward and backward (see ``use_per_layer_weights``). Split
    one stacked array at a time; with ``consume`` each is deleted once split, so the device holds the base plus one
    array at most (the caller's ``frozen`` is then used up)."""
    leaves, treedef = jax.tree.flatten(frozen["layers"])
    n = leaves[0].shape[0]
    shard_leaves = [treedef.flatten_up_to(s) for s in shardings] if shardings is not None else None
    split = []
    for j, a in enumerate(leaves):
        split.append([a[i] if shard_leaves is None else jax.device_put(a[i], shard_leaves[i][j]) for i in range(n)])
        if consume and isinstance(a, jax.Array):
            a.delete()
    layers = [jax.tree.unflatten(treedef, [s[i] for s in split]) for i in range(n)]
    return {**frozen, "layers": layers}


def use_per_layer_weights(choice: str, remat: str) -> bool:
    """``layer_weights`` (auto | stacked | per_layer) resolved. auto = per layer on a GPU without remat, as measured
    (a 7B LoRA step on an H200: 263 → 217 ms, 35.6 → 43.2 % MFU, device peak 50.9 → 40.4 GiB, compile 15 → 128 s);
    with remat the scan stays until a GPU measures the loop's memory; a CPU keeps it (no faster, a 10× compile)."""
    if choice == "auto":
        return jax.default_backend() == "gpu" and remat == "none"
    return choice == "per_layer"


def per_layer_shardings(shardings: dict, num_layers: int) -> dict:
    """The shardings of :func:`unstack_layers`' result from those of the stacked ``frozen`` (the layer axis is
    never sharded: each layer's spec is the stacked one without its first entry)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def drop_layer_axis(s):
        return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))

    one = jax.tree.map(drop_layer_axis, shardings["layers"])
    return {**shardings, "layers": [one] * num_layers}


def loss_sums(parts: ModelParts, trainable, frozen, batch: dict, dropout_key, loss_tokens_only: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, number of masked tokens)`` for one (micro)batch. ``loss_tokens_only``: the LM
    head and cross-entropy run on the loss-masked tokens alone (``masked_head_loss``), as fine-tuning wants, when
    the head is frozen (LoRA); a trained head (full fine-tuning) keeps the whole-batch head, whose gradient is one
    product instead of one per chunk."""
    model, layers = parts.model_and_layers(trainable, frozen)
    mask = batch["loss_mask"].astype(jnp.float32)
    head_trained = ("embed" if model.cfg.tie_embeddings else "lm_head") in trainable
    if loss_tokens_only and not head_trained:
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key,
                       layers=layers, return_hidden=True)
        with full_fp32_dots(model.compute_dtype):
            total = masked_head_loss(hidden, model.head_weight(), batch["targets"], mask, loss_chunk())
        return total, jnp.sum(mask)
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key,
                      layers=layers)
    return jnp.sum(token_losses(logits, batch["targets"]) * mask), jnp.sum(mask)


def loss_chunk() -> int:
    """Tokens per row in each chunk of ``masked_head_loss``: ``LOSS_CHUNK`` on a CPU (measured), 512 on an
    accelerator, where a batch-1 chunk's head GEMM needs that many rows to be compute-bound (not measured yet)."""
    return LOSS_CHUNK if jax.default_backend() == "cpu" else 512


def masked_head_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int
                     ) -> jax.Array:
    """``sum(token_losses(hidden @ head, targets) * mask)``, with the LM head computed only where it counts; the
    head is a constant here (a frozen head: no gradient reaches it), ``hidden`` gets its gradient.

    Each row's loss tokens are moved to its front (a stable sort: their order kept), the rows are cut into chunks
    of ``chunk`` tokens, and a chunk runs the head and cross-entropy only if some row has a loss token in it. A
    fine-tuning batch whose responses are 1/5 of its tokens then runs about 1/5 of the head's GEMMs, forward and
    backward (SmolLM2's head is vocab 49152 × 576: a fifth of the model's FLOPs per token), and no chunk's logits
    outlive it (``head_chunk_loss``). Rows stay where they were, so a batch sharded over the data axis stays so."""
    head = jax.lax.stop_gradient(head)
    b, t = mask.shape
    c = min(chunk, t)
    n = -(-t // c)
    order = jnp.argsort((mask <= 0).astype(jnp.int32), axis=1, stable=True)
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets, mask = (jnp.take_along_axis(a, order, axis=1) for a in (targets, mask))

    def chunks(a):  # [B, T, ...] -> [n, B, c, ...], the tail padded with masked-out tokens
        a = jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, n, c, *a.shape[2:]).swapaxes(0, 1)

    def body(total, xs):
        h, y, m = xs
        part = jax.lax.cond(jnp.any(m > 0), lambda: head_chunk_loss(h, head, y, m),
                            lambda: jnp.zeros((), jnp.float32))
        return total + part, None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(mask)))[0]


@jax.custom_vjp
def head_chunk_loss(h: jax.Array, head: jax.Array, y: jax.Array, m: jax.Array) -> jax.Array:
    """``sum(token_losses(h @ head, y) * m)`` whose forward also takes the gradient of ``h`` (the cross-entropy's
    ``(softmax − onehot) · m`` in fp32, cast to the logits' dtype as autodiff casts it, through the head), so the
    backward only scales it: the ``[tokens, vocab]`` logits are never kept for the backward. The head gets no
    gradient (``masked_head_loss`` passes a frozen one)."""
    return _head_chunk_fwd(h, head, y, m)[0]


def _head_chunk_fwd(h, head, y, m):
    logits = h @ head
    z = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(z, axis=-1)
    loss = jnp.sum((logz - jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]) * m)
    dz = ((jnp.exp(z - logz[..., None]) - jax.nn.one_hot(y, z.shape[-1], dtype=jnp.float32)) * m[..., None]
          ).astype(logits.dtype)
    return loss, dz @ head.T


def _head_chunk_bwd(dh, g):
    return (dh * g).astype(dh.dtype), None, None, None


head_chunk_loss.defvjp(_head_chunk_fwd, _head_chunk_bwd)


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, schedule: Callable, grad_accum: int = 1,
                    use_dropout: bool = True, loss_tokens_only: bool = False) -> Callable:
    """Build the pure step. ``state = {"params", "opt_state", "step", "rng"}``. ``loss_tokens_only``: see
    ``loss_sums``."""

    def step(state: dict[str, Any], frozen, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(
            lambda p, b, k: loss_sums(parts, p, frozen, b, k if use_dropout else None, loss_tokens_only),
            has_aux=True)

        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state["params"], batch, key)
        else:
            def acc(carry, xs):
                mb, i = xs
                (ls, c), g = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (ls, c, g)), None

            zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss_sum, count, grads), _ = jax.lax.scan(acc, zero, (micro_batches(batch, grad_accum),
                                                                   jnp.arange(grad_accum)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), "tokens": count}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return step


def micro_batches(batch: dict, grad_accum: int) -> dict:
    """``[B, ...]`` → ``[grad_accum, B / grad_accum, ...]``: micro-batch i takes rows i, i+A, i+2A… so every
    micro-batch stays spread over the data axis."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                        batch)


def make_eval_step(parts: ModelParts, grad_accum: int = 1, loss_tokens_only: bool = False) -> Callable:
    """``(params, frozen, batch) -> (loss sum, token count)``, in the train step's micro-batches (the logits of a
    whole global batch at once may not fit where its micro-batches do)."""
    def eval_step(params, frozen, batch):
        if grad_accum == 1:
            return loss_sums(parts, params, frozen, batch, None, loss_tokens_only)

        def acc(carry, mb):
            return jax.tree.map(jnp.add, carry, loss_sums(parts, params, frozen, mb, None, loss_tokens_only)), None

        return jax.lax.scan(acc, (jnp.zeros(()), jnp.zeros(())), micro_batches(batch, grad_accum))[0]

    return eval_step


def device_peak_flops(dtype: str) -> float | None:
    """``mfu_peak`` of device 0 (None on CPU, or for a float32 run)."""
    return mfu_peak(jax.devices()[0].device_kind, dtype)
