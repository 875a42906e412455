"""The training loop: build the model on the mesh, step, evaluate, log, checkpoint (Orbax), resume exactly.

A run's folder (``WORKDIR``)::

    run.json            resolved config, base-model pointer, tokenizer  (written once, first)
    config.yaml         the same config, for people
    base/               the frozen base, when it was randomly initialised from a preset (small models)
    checkpoints/<step>/ state (trainable params, optimiser state, step, rng) + data iterator state
    metrics.jsonl       one JSON object per logged step ({"step", "loss", ...}) and per eval
    tb/                 TensorBoard events
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from cancerllm_jax import sharding
from cancerllm_jax.config import ModelConfig, PRESETS, to_dict
from cancerllm_jax.errors import PeerLost, Terminated, UserError
from cancerllm_jax.hostmem import release_stranded_memory
from cancerllm_jax.train import run_io
from cancerllm_jax.train.config import RESUMABLE_CHANGES, TrainConfig, absolute_paths, diff
from cancerllm_jax.train.optim import make_optimizer, schedule
from cancerllm_jax.train.step import (BATCH_KEYS, ModelParts, device_peak_flops, lora_train_flops_per_token,
                                      make_eval_step, make_train_step, per_layer_shardings, unstack_layers,
                                      use_per_layer_weights)


class NonFiniteLoss(UserError):
    """The loss (train or eval, or the loss of the weights about to be saved) became NaN or inf; the run stopped
    without saving, and its checkpoints are those whose weights gave a finite loss."""


@dataclass
class DataBundle:
    """What a task gives the loop: a resumable iterator of this process's rows, eval batches, and counts."""

    train_iter: Any
    eval_batches: list
    stats: dict
    seq_len: int


def is_main() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def source_passes(sources: list[dict], rows: int) -> list[float]:
    """How many times a run of ``rows`` training rows reads each weighted source's blocks (rows split by weight)."""
    total = sum(float(s["weight"]) for s in sources)
    return [rows * float(s["weight"]) / total / max(1, s["train_blocks"]) for s in sources]


def oversampling_warning(sources: list[dict], passes: list[float]) -> str | None:
    """A warning when the weights make the run read one source twice or more while another is not read through
    once (a small source repeated many times: meant in a mixture such as 15:1:4, a slip otherwise); else None."""
    if max(passes) < 2 or min(passes) >= 1:
        return None
    i = passes.index(max(passes))
    return (f"warning: source {sources[i]['name']} is read ≈{passes[i]:.2g} times over the run while another "
            "source is not read through once: its weight oversamples it (as a mixture such as 15:1:4 means to); if "
            "that is not meant, lower its weight or give it more text")


def say(msg: str) -> None:
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def resolve_dtype_name(cfg: TrainConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# ------------------------------------------------------------------------------------------------ the base model

def load_base(cfg: TrainConfig) -> tuple[ModelConfig, dict | None, str | None, dict]:
    """``(model config, base params or None for a preset, tokenizer spec, pointer)``."""
    if cfg.model in PRESETS:
        return PRESETS[cfg.model], None, None, {"kind": "preset", "name": cfg.model, "seed": cfg.seed}
    from cancerllm_jax.api import read_weights
    from cancerllm_jax.model.lora import merge_lora_params

    w = read_weights(cfg.model)
    params = w.params
    if w.lora is not None and w.lora_params is not None:
        say(f"base {cfg.model}: merging its LoRA (r={w.lora.rank}) into the base weights")
        params = merge_lora_params(params, w.lora_params, w.lora)
    return w.cfg, params, w.tokenizer_spec, {"kind": "path", "path": os.path.abspath(cfg.model),
                                             "model": to_dict(w.cfg), "weights_digest": run_io.weights_digest(params)}


class _SigtermStop:
    """SIGTERM (a pre-empting scheduler, ``kill``) stops a run cleanly instead of killing it mid-save: the handler
    only notes it (an exception raised from it in the middle of an XLA compile crashed the process), and the loop,
    at its next step, saves the step it has finished and raises ``Terminated``. A single-process run treats a first
    Ctrl-C (SIGINT) alike; a second one stops at once, as Python does. A multi-process run uses JAX's preemption
    service instead (its own SIGTERM handler, set when the processes connect): the notice reaches every process,
    and all of them stop at the same step (``reached_preemption_sync_point``), as the collective save needs."""

    def __init__(self):
        self.asked = False
        self.signal = "SIGTERM"

    def install(self) -> dict:
        """Set the handlers; returns ``{signal: the handler it replaced}``. None set off the main thread (where none
        can be) and in a multi-process run (JAX's handler is in place); SIGINT's only where Python's own is set (not
        where the shell made the run ignore it)."""
        if jax.process_count() > 1:
            return {}
        previous = {}
        try:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        except ValueError:
            pass
        return previous

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.asked:
                raise KeyboardInterrupt
            print("\nCtrl-C: the run saves the step it is on, then stops (Ctrl-C again stops at once, without "
                  "saving)", file=sys.stderr, flush=True)
        if not self.asked:
            self.signal = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        self.asked = True

    def stop_before(self, step: int) -> bool:
        """Whether to save and stop before running step ``step + 1``; every process of a run calls it at every step
        with the same ``step`` (the run's real step, which Orbax's checkpoint manager reports to the service too)."""
        if jax.process_count() > 1 and not self.asked:
            from jax.experimental import multihost_utils

            try:
                self.asked = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service): SIGTERM kills
                pass
        return self.asked


def example_text(tokenizer, batch: dict, limit: int = 4000) -> str:
    """The first row of a batch as the model reads it, and the tokens its loss is taken on (``--log-examples``
    only: it is note text)."""
    inputs, targets = np.asarray(batch["inputs"][0]), np.asarray(batch["targets"][0])
    seen, scored = np.asarray(batch["segment_ids"][0]) > 0, np.asarray(batch["loss_mask"][0]) > 0

    def cut(text: str) -> str:
        return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit} more characters)"

    return (f"--log-examples: row 0 of the first batch, {int(seen.sum())} tokens, the loss on {int(scored.sum())} of "
            f"them\n--- input ---\n{cut(tokenizer.decode(inputs[seen].tolist()))}\n--- loss on ---\n"
            f"{cut(tokenizer.decode(targets[scored].tolist()))}\n--- end ---")


def base_for_data(cfg: TrainConfig, dry_run: bool = False) -> tuple[tuple | None, str | None]:
    """``(base, tokenizer spec)`` for a launcher that reads its data before the ``Trainer`` exists (steps from
    epochs): the tokenizer the config names, else the base's, read here once (``base``, None when not read; pass
    it on to the ``Trainer``); with ``dry_run`` without its weights."""
    if cfg.data.tokenizer:
        return None, cfg.data.tokenizer
    base = dry_base(cfg) if dry_run else load_base(cfg)
    return base, base[2]


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, params: dict | None, dtype: str, abstract: bool = False):
    """The NNX model: LoRA factors (fp32) on a frozen base in ``dtype``, or all weights trainable with ``full``."""
    from cancerllm_jax.model import abstract_model, create_model, model_from_params

    lora = None if cfg.full else cfg.lora
    param_dtype = "float32" if cfg.full else dtype
    if abstract:
        graphdef, state = abstract_model(model_cfg, lora, param_dtype, dtype, cfg.remat, cfg.attention)
        return nnx.merge(graphdef, state)
    if params is None:
        return create_model(model_cfg, lora, param_dtype, dtype, cfg.remat, seed=cfg.seed, attention=cfg.attention)
    return model_from_params(model_cfg, params, lora, param_dtype, dtype, cfg.remat, lora_seed=cfg.seed,
                             attention=cfg.attention)


# ------------------------------------------------------------------------------------------------------ trainer

class Trainer:
    """Holds the compiled step, the state on the mesh and the checkpoint manager for one run."""

    def __init__(self, cfg: TrainConfig, workdir: str, kind: str, make_data: Callable | None,
                 resume: bool = False, dry_run: bool = False, extra_meta: dict | None = None,
                 base: tuple | None = None):
        """``base``: what ``load_base(cfg)`` returned, when the caller has read it already."""
        self.cfg, self.kind, self.workdir = cfg, kind, os.path.abspath(workdir)
        self.dry_run = dry_run
        d, m = sharding.parse_mesh(cfg.mesh)
        self.mesh = sharding.make_mesh((d, m))
        if cfg.batch_size % d:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the data axis of mesh {cfg.mesh} "
                            f"({d}); use a multiple of {d}")
        if (cfg.batch_size // cfg.optim.grad_accum) % d:
            raise UserError(f"micro-batch {cfg.batch_size // cfg.optim.grad_accum} (batch_size / grad_accum) is not "
                            f"divisible by the data axis ({d})")
        self.dtype = resolve_dtype_name(cfg)
        self.model_cfg, base_params, tok_spec, self.base_pointer = (
            base or (dry_base(cfg) if dry_run else load_base(cfg)))
        self.tokenizer_spec = tok_spec
        self.extra_meta = extra_meta or {}
        model = build_model(cfg, self.model_cfg, base_params, self.dtype, abstract=dry_run)
        # frozen layer weights one array per layer (only LoRA freezes layers); the caller's arrays are never deleted
        self.per_layer = not cfg.full and use_per_layer_weights(cfg.layer_weights, cfg.remat)
        base_buffers = _device_buffers(base_params) if self.per_layer else set()
        del base_params, base
        trainable_filter = nnx.Param if cfg.full else nnx.LoRAParam
        graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
        self.parts = ModelParts(graphdef, trainable, frozen)
        trainable_pure, frozen_pure = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
        notice = say
        self.frozen_sh = sharding.param_shardings(frozen_pure, self.mesh, self.model_cfg, cfg.fsdp, notice)
        stacked_sh = self.frozen_sh
        if self.per_layer:
            self.frozen_sh = per_layer_shardings(stacked_sh, self.model_cfg.num_layers)
        self.trainable_sh = (sharding.param_shardings(trainable_pure, self.mesh, self.model_cfg, cfg.fsdp, notice)
                             if cfg.full else jax.tree.map(lambda _: sharding.replicated(self.mesh), trainable_pure))
        self.tx = make_optimizer(cfg.optim, cfg.steps)
        self.schedule = schedule(cfg.optim, cfg.steps)
        self.batch_sh = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        trainable_abs = _abstract(trainable_pure, self.trainable_sh)
        opt_abs = jax.eval_shape(self.tx.init, trainable_abs)
        # optimiser moments take their param's sharding (by tree position: q and o may share a shape, not a spec)
        self.opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abs, self.trainable_sh,
                                            transform_non_params=lambda _: rep)
        if dry_run:
            if self.per_layer:
                frozen_pure = {**frozen_pure, "layers": [jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), frozen_pure["layers"])]
                    * self.model_cfg.num_layers}
            self.frozen = _abstract(frozen_pure, self.frozen_sh)
            self.state = {"params": trainable_abs, "opt_state": _abstract(opt_abs, self.opt_sh),
                          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                          "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
        else:
            if jax.process_count() > 1:  # from host copies: a one-device array put on a mesh spanning processes
                # can come out with two shards per device buffer (seen with one device per process)
                frozen_pure, trainable_pure = jax.tree.map(np.asarray, (frozen_pure, trainable_pure))
            self.frozen = jax.device_put(frozen_pure, stacked_sh)
            if self.per_layer:
                # device_put may hand back the caller's buffers (same dtype, an equivalent sharding) in a new Array
                owned = not _device_buffers(self.frozen["layers"]) & base_buffers
                self.frozen = unstack_layers(self.frozen, self.frozen_sh["layers"], consume=owned)
            params = jax.device_put(trainable_pure, self.trainable_sh)
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)
            self.state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                          "rng": jax.random.PRNGKey(cfg.seed)}
            self.state["step"] = jax.device_put(self.state["step"], rep)
            self.state["rng"] = jax.device_put(self.state["rng"], rep)
        del model, frozen, trainable
        self.state_sh = {"params": self.trainable_sh, "opt_state": self.opt_sh, "step": rep, "rng": rep}
        use_dropout = (not cfg.full) and cfg.lora.dropout > 0
        sparse = kind == "finetune"  # responses only: the LM head runs on the loss tokens alone
        step_fn = make_train_step(self.parts, self.tx, self.schedule, cfg.optim.grad_accum, use_dropout, sparse)
        self.step_fn = jax.jit(step_fn, in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
                               out_shardings=(self.state_sh, rep), donate_argnums=(0,))
        self.eval_fn = jax.jit(make_eval_step(self.parts, cfg.optim.grad_accum, sparse),
                               in_shardings=(self.trainable_sh, self.frozen_sh, self.batch_sh),
                               out_shardings=(rep, rep))
        self.make_data = make_data
        self.resume = resume
        self._sigterm = _SigtermStop()

    # -- memory ----------------------------------------------------------------------------------------------
    def memory_estimate(self, seq_len: int) -> dict:
        """Per-device bytes from the compiled step's memory analysis (arguments, outputs, temporaries)."""
        batch = {k: jax.ShapeDtypeStruct((self.cfg.batch_size, seq_len), jnp.int32, sharding=self.batch_sh)
                 for k in BATCH_KEYS}
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                             self.state_sh)
        frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.frozen,
                              self.frozen_sh)
        t0 = time.time()
        compiled = self.step_fn.lower(state, frozen, batch).compile()
        ma = compiled.memory_analysis()
        out = {"compile_s": round(time.time() - t0, 1)}
        if ma is not None:
            for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                         "alias_size_in_bytes"):
                out[name.replace("_size_in_bytes", "_bytes")] = int(getattr(ma, name, 0) or 0)
            out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                                  - out["alias_bytes"])
        return out

    def sharding_lines(self) -> list[str]:
        """One line per parameter: kind, path, shape, dtype and PartitionSpec on the mesh (per-layer frozen weights:
        one line for every layer's, as ``layers.*``)."""
        frozen = self.frozen
        if self.per_layer:
            frozen = {**frozen, "layers": {"*": frozen["layers"][0]}}
        lines = []
        for kind, tree in (("trainable", self.state["params"]), ("frozen", frozen)):
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                name = ".".join(str(getattr(p, "key", p)) for p in path)
                spec = getattr(getattr(x, "sharding", None), "spec", None)
                lines.append(f"  {kind:9s} {name:22s} {str(tuple(x.shape)):22s} {str(x.dtype):8s} {spec}")
        return lines

    def describe(self, seq_len: int, shardings: bool = False) -> str:
        n_base = self.model_cfg.num_params()
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))
        mem = self.memory_estimate(seq_len)
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lora_text = f"LoRA r={self.cfg.lora.rank} on {list(self.cfg.lora.targets)}"
        lines = [f"model: {self.cfg.model} ({n_base / 1e6:.1f}M params, {self.model_cfg.num_layers} layers), "
                 f"{'full fine-tuning' if self.cfg.full else lora_text}"
                 f", trainable {n_train / 1e6:.3f}M, dtype {self.dtype}, remat {self.cfg.remat}, layer weights "
                 f"{'per layer (a Python loop)' if self.per_layer else 'stacked (a scan)'}",
                 f"mesh {self.cfg.mesh} on {jax.device_count()} {jax.default_backend()} device(s); global batch "
                 f"{self.cfg.batch_size} x {seq_len} tokens; grad_accum {self.cfg.optim.grad_accum}"]
        if "total_bytes" in mem:
            lines.append(f"memory estimate per device (compiled step): {gib(mem['total_bytes'])} "
                         f"(arguments {gib(mem['argument_bytes'])}, temporaries {gib(mem['temp_bytes'])}, "
                         f"outputs {gib(mem['output_bytes'])}); compile {mem['compile_s']} s")
            limit = sharding.device_memory_bytes(self.mesh)
            if limit and mem["total_bytes"] > limit:
                lines.append(f"warning: that is more than the device's {gib(limit)}: the run may run out of memory "
                             f"(lower the batch size or the sequence length, use remat, or a larger --mesh)")
        if seq_len > self.model_cfg.max_position_embeddings:
            lines.append(f"warning: sequences of {seq_len} tokens go past the model's max_position_embeddings "
                         f"({self.model_cfg.max_position_embeddings}): positions it was not trained for")
        if shardings:
            lines += ["parameters (kind, path, shape, dtype, PartitionSpec over ('data', 'model')):",
                      *self.sharding_lines()]
        self.memory = mem
        return "\n".join(lines)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep, create=True,
                                            enable_async_checkpointing=True)
        return ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"), options=opts,
                                     item_names=("state", "data"))

    def _save(self, mngr, step: int, it, batch) -> None:
        """Checkpoint the state and the data iterator at ``step``, once the new weights are checked on ``batch``
        (the step's own; None: no step ran in this process, nothing new to check)."""
        import grain
        import orbax.checkpoint as ocp

        if batch is not None:
            self._check_new_weights(batch, step, mngr)
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                data=grain.checkpoint.CheckpointSave(it)), force=True)

    def _restore(self, mngr, step: int, it) -> None:
        import grain
        import orbax.checkpoint as ocp

        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                              self.state_sh)
        from cancerllm_jax.checkpoint.orbax_io import unreadable

        where = f"{self.workdir}/checkpoints/{step}"
        data_dir = os.path.join(where, "data")
        saved = [n for n in os.listdir(data_dir) if n.startswith("process_")] if os.path.isdir(data_dir) else []
        if saved and f"process_{jax.process_index()}-of-{jax.process_count()}.json" not in saved:
            n = saved[0].rsplit("-of-", 1)[-1].removesuffix(".json")
            raise UserError(f"{where} was written by {n} process(es), not {jax.process_count()}: resume with "
                            f"--num-processes {n} (the data iterator's position is saved per process)")
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  data=grain.checkpoint.CheckpointRestore(it)))
        except Exception as e:
            raise unreadable(where, e, "; restore it, or remove it to resume from an earlier one") from None
        self.state = restored["state"]

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop, with a checkpoint, after step ``stop_after``: a resumable pause). A
        single-process run holds its workdir: a second run there (a relaunch while it trains) is refused."""
        self._workdir_lock = None
        previous = self._sigterm.install()
        try:
            return self._run(stop_after)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self._workdir_lock is not None:
                self._workdir_lock.__exit__(None, None, None)
                self._workdir_lock = None

    def _hold_workdir(self) -> None:
        """Lock the existing workdir (single-process runs: a lock file on a shared filesystem would not bind the
        other hosts of a multi-host run, and one host refused alone would leave the others at a barrier)."""
        if jax.process_count() == 1 and self._workdir_lock is None and os.path.isdir(self.workdir):
            self._workdir_lock = run_io.FolderLock(self.workdir, "--workdir").__enter__()

    def _run(self, stop_after: int | None) -> dict:
        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(max(stop_after, 0), cfg.steps)
        self._hold_workdir()  # before reading what is there (a new workdir: once made, below)
        start_step = self._prepare_workdir()
        # JAX's preemption service agrees on the step after the highest one the processes last reported: report the
        # run's first step now, before restoring and compiling (a notice then stops the run after its first step;
        # reported only from the loop, a resumed run would be told to stop at step 1, which it never reaches)
        self._sigterm.stop_before(start_step)
        tokenizer = None
        from cancerllm_jax.data.tokenizer import load_tokenizer

        tok_spec = getattr(getattr(cfg, "data", None), "tokenizer", None) or self.tokenizer_spec
        tokenizer = load_tokenizer(tok_spec)
        if tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name', tok_spec)} has {tokenizer.vocab_size} tokens but "
                            f"the model's vocabulary is {self.model_cfg.vocab_size}: they do not belong together")
        data: DataBundle = self.make_data(tokenizer, jax.process_index(), jax.process_count())
        self.data_counts = {k: v for k, v in data.stats.items() if not isinstance(v, (list, dict))}
        was = self.resumed_meta.get("data_counts") if start_step else None
        now = self.data_counts if was is None or "digest" in was else {  # a run saved before digests: counts alone
            k: v for k, v in self.data_counts.items() if not k.endswith("digest")}
        if was is not None:  # a count this version adds is absent from a run saved before it: only that one is let go
            now = {k: v for k, v in now.items() if k in was or k not in COUNTS_ADDED_LATER}
        if was is not None and was != now:
            keys = diff(was, now)
            changed = ", ".join(f"{k} {was.get(k)} -> {now.get(k)}" for k in keys)
            if all(k.endswith("digest") for k in keys):
                changed = f"the same counts, but other text or the lines in another order: {changed}"
            if "repeated_documents" not in was and self.data_counts.get("repeated_documents"):
                raise UserError(f"--resume: the run in {self.workdir} was started by an earlier version, which could "
                                f"split copies of one text between training and evaluation; this corpus repeats "
                                f"{self.data_counts['repeated_documents']} documents, and this version keeps every "
                                f"copy on one side, so its split differs ({changed}). Start a new --workdir, or "
                                f"resume with the version that started the run")
            raise UserError(f"--resume: the training data differs from the run in {self.workdir} ({changed}); resume "
                            f"with the same data or start a new --workdir")
        if start_step == 0:
            if is_main():
                os.makedirs(self.workdir, exist_ok=True)
            sync("cancerllm:workdir-made")
            self._hold_workdir()
            self._start_fresh()
        say(self.describe(data.seq_len))
        if is_main():
            say(f"data: {json.dumps(self.data_counts)}")
            sources = data.stats.get("sources") or []
            if len(sources) > 1:  # which weight went to which source, and how often the run reads each
                passes = source_passes(sources, cfg.steps * cfg.batch_size)
                say("sources: " + "; ".join(f"{s['name']}: weight {s.get('weight')}, {s['train_blocks']} train blocks, "
                                            f"≈{p:.2g} passes over the run" for s, p in zip(sources, passes)))
                warning = oversampling_warning(sources, passes)
                if warning:
                    say(warning)
        mngr = self._manager()
        it = data.train_iter
        if start_step > 0:
            self._restore(mngr, start_step, it)
            say(f"resumed from step {start_step} ({self.workdir}/checkpoints/{start_step})")
        logger = _MetricsLog(self.workdir, start_step) if is_main() else None
        def flops_tok(loss_share: float) -> float:  # LoRA fine-tuning runs the LM head on the loss tokens alone
            share = loss_share if self.kind == "finetune" and not cfg.full else 1.0
            return lora_train_flops_per_token(self.model_cfg, data.seq_len, None if cfg.full else cfg.lora.rank,
                                              cfg.lora.targets, share)

        peak = device_peak_flops(self.dtype)  # no MFU for float32 (no peak in the table)
        step = start_step
        last_saved = start_step
        # holes of more than half a step's temporaries (those of every device of this process) are given back
        stranded_limit = (getattr(self, "memory", {}).get("temp_bytes") or 2**30) * len(self.mesh.local_devices) // 2
        bar = _progress(cfg.steps, start_step)
        eval_every, save_every = cfg.every("eval_every"), cfg.every("save_every")
        peer_lost = False
        batch = None  # the last step's batch, on which the weights are checked before a save
        if start_step == 0 and eval_every and data.eval_batches and not self._sigterm.asked:
            self._evaluate(data.eval_batches, 0, logger, mngr)  # the baseline that periodic evals are read against
        try:
            while step < end:
                if self._sigterm.stop_before(step):  # pre-empted: keep this step's progress, then stop
                    if step > last_saved:
                        self._save(mngr, step, it, batch)
                    raise Terminated(step if step > start_step else None, self._sigterm.signal, self.workdir)
                local = next(it)
                if cfg.log_examples and step == start_step and is_main():
                    say(example_text(tokenizer, local))
                batch = {k: jax.make_array_from_process_local_data(self.batch_sh, np.asarray(local[k], np.int32))
                         for k in BATCH_KEYS}
                release_stranded_memory(stranded_limit)  # CPU only, before the step allocates: see hostmem.py
                t0 = time.perf_counter()
                self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                step += 1
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    # a non-finite gradient with a finite loss has already made the new weights NaN: never saved
                    raise NonFiniteLoss(f"loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step "
                                        f"{step}; {self._stopped(mngr)}")
                tokens = cfg.batch_size * data.seq_len  # positions computed, padding included (what MFU counts)
                row = {"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                       "target_tokens": int(metrics["tokens"]), "tokens_per_s": tokens / dt,
                       "target_tokens_per_s": metrics["tokens"] / dt, "step_s": dt}
                if peak:
                    row["mfu"] = flops_tok(metrics["tokens"] / tokens) * tokens / dt / (peak * jax.device_count())
                if logger and (step % cfg.log_every == 0 or step == end):
                    logger.write(row)
                bar(step, row)
                if eval_every and step % eval_every == 0 and step < cfg.steps:
                    self._evaluate(data.eval_batches, step, logger, mngr)
                if save_every and step % save_every == 0 and step < cfg.steps:
                    self._save(mngr, step, it, batch)
                    last_saved = step
            # saved before the final evaluation (a long one on a big model): a scheduler's kill during it, or an
            # out-of-memory, loses no step; SIGTERM abandons it, and --resume then evaluates the saved step
            if last_saved != step or mngr.latest_step() != step:
                self._save(mngr, step, it, batch)
            mngr.wait_until_finished()
            if data.eval_batches and step == cfg.steps and (
                    step > start_step or self._final_eval_missing(logger, step)):
                if not self._evaluate(data.eval_batches, step, logger, mngr):
                    raise Terminated(step if step > start_step else None, self._sigterm.signal, self.workdir)
        except Exception as e:
            if jax.process_count() > 1 and not isinstance(e, UserError):
                peer_lost = True  # the checkpoint manager's barriers would wait for the dead peer (and log tracebacks)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise PeerLost(
                    f"another process of this {jax.process_count()}-process run stopped or cannot be reached "
                    f"(at step {step}: {type(e).__name__}: {first}); this process (process {jax.process_index()}) "
                    f"stops too. Start every process again with the same flags plus --resume: the run continues "
                    f"from its last complete checkpoint in {self.workdir}/checkpoints") from e
            raise
        finally:
            if not peer_lost:
                mngr.wait_until_finished()
                mngr.close()
            if logger:
                logger.close()
        return {"steps": step, "workdir": self.workdir}

    def _stopped(self, mngr) -> str:
        """What a NonFiniteLoss error says after its cause: nothing saved, the last checkpoint, what to do."""
        good = mngr.latest_step()
        kept = (f"The last checkpoint (its weights gave a finite loss) is step {good} in {self.workdir}/checkpoints."
                if good else "No checkpoint was saved before it.")
        return (f"stopped without saving. {kept} Lower optim.lr (in a new --workdir: --resume keeps the run's "
                f"settings), check the data, or use dtype=float32.")

    def _check_new_weights(self, batch, step: int, mngr) -> None:
        """Before a checkpoint is saved: its weights (after step ``step``'s update) give a finite loss on that step's
        batch. The step's own loss is computed before its update, so a last update that made the model diverge (a
        far too large learning rate) would otherwise be saved as a run that looks complete."""
        total, _ = self.eval_fn(self.state["params"], self.frozen, batch)
        if not math.isfinite(float(total)):
            raise NonFiniteLoss(f"the update of step {step} made the loss non-finite ({float(total)} on that step's "
                                f"batch); {self._stopped(mngr)}")

    def _final_eval_missing(self, logger, step: int) -> bool:
        """A finished run resumed: whether its final evaluation (of ``step``) was cut short (SIGTERM, a kill); every
        process gets the main process's answer (it alone writes the log)."""
        missing = logger is not None and step not in logger.eval_steps
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
        return missing

    def _evaluate(self, batches, step, logger, mngr) -> bool:
        """The held-out loss at ``step``, logged; False (nothing logged) when SIGTERM or a first Ctrl-C cut it short
        (a multi-process run learns of one only between steps, on every process at once)."""
        limit = self.cfg.eval_batches or len(batches)
        total = count = 0.0
        for local in batches[:limit]:
            if self._sigterm.asked:
                say(f"step {step}: evaluation abandoned ({self._sigterm.signal})")
                return False
            b = {k: jax.make_array_from_process_local_data(self.batch_sh, np.asarray(local[k], np.int32))
                 for k in BATCH_KEYS}
            s, c = self.eval_fn(self.state["params"], self.frozen, b)
            total += float(s)
            count += float(c)
        if count and not math.isfinite(total):
            if step == 0:  # before any update: not the learning rate
                raise NonFiniteLoss(f"the base model's eval loss is {total / count} before training; check the data "
                                    f"and the base weights, or use dtype=float32")
            if mngr.latest_step() == step:  # the final step, saved before its evaluation: not kept as a good run
                mngr.delete(step)
            raise NonFiniteLoss(f"eval loss is {total / count} at step {step}; {self._stopped(mngr)}")
        if count and logger:
            loss = total / count
            logger.write({"step": step, "eval_loss": loss, "eval_tokens": int(count)})
            say(f"step {step}: eval loss {loss:.4f} over {int(count)} tokens")
        return True

    def _prepare_workdir(self) -> int:
        """Write run.json on a fresh run; on ``resume`` check the config and return the latest checkpoint step.

        Multi-process: every process looks at the folder, then (after a barrier) process 0 alone changes it, and no
        process goes on before run.json and base/ are complete (a second barrier).
        """
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise UserError(f"--workdir {self.workdir} is a file, not a folder")
        meta_path = os.path.join(self.workdir, run_io.RUN_FILE)
        ckpt_dir = os.path.join(self.workdir, "checkpoints")
        latest = run_io.latest_step(ckpt_dir)
        has_meta = os.path.isfile(meta_path)
        if not has_meta and not latest:
            _refuse_foreign_files(self.workdir)
        old = run_io.read_run_meta(self.workdir) if has_meta and latest else None
        sync("cancerllm:workdir-inspected")  # nobody writes before every process has looked
        if has_meta and not latest and not self.resume:
            say(f"note: {self.workdir} holds a run that never saved a checkpoint; starting it again")
            has_meta = False
        if has_meta and latest:
            if not self.resume:
                raise UserError(f"{self.workdir} already holds a run; pass --resume to continue it or choose "
                                f"another --workdir")
            # a run recorded before its paths were absolute: read from here, where it was resumed before
            recorded = absolute_paths(old["config"])
            changed = [k for k in diff(recorded, to_dict(self.cfg)) if k.split(".")[0] not in RESUMABLE_CHANGES]
            was_dtype = old.get("dtype")
            if "dtype" in changed and self.dtype == was_dtype and "auto" in (recorded.get("dtype"), self.cfg.dtype):
                changed.remove("dtype")  # `auto` and the dtype it chose (or chooses here) are the same setting
            if changed:
                raise UserError(f"--resume: the config differs from the run in {self.workdir} in {changed}; resume "
                                f"with the same settings or start a new --workdir")
            if was_dtype and was_dtype != self.dtype:  # `auto` chooses by device: a CPU-started run on a GPU host
                raise UserError(f"--resume: the run in {self.workdir} trained in {was_dtype}, but dtype "
                                f"{self.cfg.dtype} is {self.dtype} on this host's {jax.default_backend()}; resume "
                                f"with dtype={was_dtype} (or on the kind of host it started on) to continue it as it "
                                "trained")
            model = to_dict(self.model_cfg)
            changed = diff(old["model"], {k: model.get(k) for k in old["model"]})
            if changed:
                raise UserError(f"--resume: the base model {self.cfg.model} is not the one the run in {self.workdir} "
                                f"trained on (its config differs in {changed})")
            was, now = (old.get("base") or {}).get("weights_digest"), self.base_pointer.get("weights_digest")
            if was and now and was != now:
                raise UserError(f"--resume: the base model {self.cfg.model} has other weights than when the run in "
                                f"{self.workdir} started (weights digest {now}, was {was}): the adapter would "
                                f"continue on another model; put the original weights back, or start a new --workdir")
            self.resumed_meta = old
            return latest
        if latest:
            raise UserError(f"{ckpt_dir} has checkpoints but no {run_io.RUN_FILE}; not a run this tool wrote")
        if self.resume:
            say(f"--resume: no checkpoint in {self.workdir} yet; starting from step 0")
        return 0

    def _start_fresh(self) -> None:
        """A new run's run.json, config.yaml and base/ (after the data was read, so bad data leaves no run). A run
        started again (it never saved a checkpoint) keeps its run.json until the new one replaces it: a kill in
        between leaves a folder that is still a run without checkpoints (started again), not someone's files."""
        self._write_meta()
        sync("cancerllm:meta-written")

    def _write_meta(self) -> None:
        """Every process calls this (saving a randomly initialised base is collective); process 0 writes files."""
        pointer = dict(self.base_pointer)
        if pointer.get("kind") == "preset" and not self.cfg.full and self.model_cfg.num_params() < 2e9:
            self._save_base(os.path.join(self.workdir, "base"))
            pointer = {**pointer, "kind": "saved", "path": "base"}
        if not is_main():
            return
        meta = {"format": run_io.FORMAT, "kind": self.kind, "config": to_dict(self.cfg), "base": pointer,
                "model": to_dict(self.model_cfg), "dtype": self.dtype, "tokenizer": self.tokenizer_spec,
                "data_counts": self.data_counts, **self.extra_meta}
        config_tmp = os.path.join(self.workdir, "config.yaml.tmp")
        try:
            with open(config_tmp, "w", encoding="utf-8") as f:
                yaml.safe_dump(to_dict(self.cfg), f, sort_keys=False)
            run_io.write_json_atomic(os.path.join(self.workdir, run_io.RUN_FILE), meta)  # the run now exists
        except BaseException:
            if os.path.exists(config_tmp):
                os.remove(config_tmp)
            raise
        # config.yaml after run.json: a folder with a config.yaml and no run.json is someone else's
        os.replace(config_tmp, os.path.join(self.workdir, "config.yaml"))

    def _save_base(self, base_dir: str) -> None:
        """The frozen base in ``checkpoint.orbax_io``'s params format (``cancerllm.json`` + Orbax ``params/``), with
        the run's tokenizer files: ``to-hf`` of ``base/`` (the base of a PEFT adapter export) gives a whole HF folder.

        Written with a collective Orbax save of the (possibly FSDP-sharded, multi-process) arrays rather than
        ``orbax_io.save_params``, whose single-process save would wait forever for the other processes.
        """
        import shutil

        import orbax.checkpoint as ocp

        from cancerllm_jax.checkpoint.orbax_io import FORMAT, META_FILE, copy_tokenizer_files

        if is_main() and os.path.exists(base_dir):
            shutil.rmtree(base_dir)  # left by a run that stopped before its run.json was written
        sync("cancerllm:base-cleared")
        frozen = self.frozen
        if self.per_layer:  # the params format stacks the layers (a model under 2B parameters: a brief copy)
            frozen = {**frozen, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *frozen["layers"])}
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(base_dir, "params"), frozen)
        ckptr.wait_until_finished()
        ckptr.close()
        if is_main():
            copy_tokenizer_files(run_io.run_tokenizer({"config": to_dict(self.cfg), "tokenizer": self.tokenizer_spec}),
                                 base_dir)
            meta = {"format": FORMAT, "model": to_dict(self.model_cfg), "dtype": self.dtype}
            run_io.write_json_atomic(os.path.join(base_dir, META_FILE), meta)


def _refuse_foreign_files(workdir: str) -> None:
    """A --workdir that holds no run may hold anything a run does not write over (a shell's log, notes), and what a
    run stopped before its run.json leaves (its lock, ``base/`` of the saved preset, ``config.yaml.tmp``). A file the
    run would overwrite or delete (``config.yaml``, written after run.json, ``metrics.jsonl``, ``tb/``, a ``base/`` or
    ``checkpoints/`` of other content) or a model folder (which ``cancerllm_jax.load`` would then read as the run)
    is refused, naming them."""
    from cancerllm_jax.checkpoint.orbax_io import META_FILE, TOKENIZER_FILES

    def temporary(name: str) -> bool:  # Orbax's unfinished saves, write_json_atomic's temp files
        return ".orbax-checkpoint-tmp" in name or (name.startswith(".") and ".tmp-" in name)

    def only(path: str, allowed: tuple[str, ...]) -> bool:
        return os.path.isdir(path) and all(n in allowed or temporary(n) for n in os.listdir(path))

    if not os.path.isdir(workdir):
        return
    names = set(os.listdir(workdir))
    base = os.path.join(workdir, "base")  # its tokenizer files only beside the params a run writes first
    ours_base = "base" in names and (only(base, ("params", META_FILE)) or (
        os.path.isdir(os.path.join(base, "params")) and only(base, ("params", META_FILE, *TOKENIZER_FILES))))
    taken = {"base": not ours_base, "checkpoints": not only(os.path.join(workdir, "checkpoints"), ()),
             "config.yaml": True, "metrics.jsonl": True, "tb": True}
    model = ("config.json", "adapter_config.json", META_FILE, "params")
    foreign = sorted(n for n in names if taken.get(n) or n in model or n.endswith(".safetensors"))
    if foreign:
        raise UserError(f"--workdir {workdir} holds no run but files a run would overwrite or delete, or a model "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give a new or empty folder")


def dry_base(cfg: TrainConfig) -> tuple[ModelConfig, None, str | None, dict]:
    """``load_base``'s answer without the weights (``--dry-run``): the model config and the tokenizer spec of a
    preset, an HF folder, a converted checkpoint or a training run."""
    if cfg.model in PRESETS:
        return PRESETS[cfg.model], None, None, {}
    from cancerllm_jax.api import check_readable, read_model_config, read_tokenizer_spec

    named = os.path.basename(os.path.normpath(cfg.model)).lower()
    if not os.path.exists(cfg.model) and named in PRESETS:  # the 7B config's placeholder folder, not yet there
        say(f"note: --dry-run: {cfg.model} does not exist; validating with the preset of its name, {named} "
            f"(the same shapes; a real run reads the folder)")
        return PRESETS[named], None, None, {}
    if not os.path.exists(cfg.model):
        raise UserError(f"--dry-run: model {cfg.model!r} is neither a preset ({sorted(PRESETS)}) nor a folder; "
                        f"pass model=mistral-7b-v0.1 to validate the shapes without the weights")
    check_readable(cfg.model)
    return read_model_config(cfg.model), None, read_tokenizer_spec(cfg.model), {}


def _device_buffers(tree) -> set[int]:
    """The addresses of the device buffers behind ``tree``'s JAX arrays (two Arrays may share one buffer)."""
    return {shard.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array) and not x.is_deleted() for shard in x.addressable_shards}


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


COUNTS_ADDED_LATER = frozenset({"repeated_documents"})  # data counts a run saved by an earlier version lacks


class _MetricsLog:
    """``metrics.jsonl`` (rows past ``start_step`` from an interrupted run are dropped) and TensorBoard."""

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.eval_steps: set[int] = set()  # the steps whose held-out loss the kept rows hold
        kept = []
        if os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
            bad = []
            for number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                    row = json.loads(line) if line.strip() else None
                    step = int(row["step"]) if row is not None else None
                except (ValueError, TypeError, KeyError, IndexError, RecursionError, ArithmeticError):
                    if number < len(lines):  # the last piece, after the last newline, is a line a kill cut
                        bad.append(number)
                    continue
                if step is not None and 0 < start_step and step <= start_step:  # a fresh start keeps none
                    kept.append(line + "\n")
                    if "eval_loss" in row:
                        self.eval_steps.add(step)
            if bad:
                say(f"warning: {self.path}: {len(bad)} unreadable line(s) dropped (first: line {bad[0]}); "
                    "the metrics log keeps the readable rows")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.f = open(self.path, "a", encoding="utf-8")
        self.tb = None
        try:
            SummaryWriter = _summary_writer_class()
            # TensorBoard shows what metrics.jsonl keeps: its events are written anew from the kept rows (the
            # writer flushes in the background, so a kill could lose some, and redone steps would show twice)
            tb_dir = os.path.join(workdir, "tb")
            for name in os.listdir(tb_dir) if os.path.isdir(tb_dir) else ():
                if name.startswith("events.out.tfevents"):
                    os.remove(os.path.join(tb_dir, name))
            self.tb = SummaryWriter(tb_dir, flush_secs=10)
            for line in kept:
                self._scalars(json.loads(line))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        self._scalars(row)

    def _scalars(self, row: dict) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch: tensorboardX imports torch when it can (only to
    accept torch tensors, which this loop never logs), ~2-4 s of every launcher's start on the CPU hosts."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # Python's documented way to make `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _rate(per_s: float) -> str:
    """A tokens-per-second figure: whole numbers, one decimal below 10 (a slow fine-tuning step is not 0 tok/s)."""
    return f"{per_s:.1f}" if per_s < 10 else f"{per_s:.0f}"


def _progress(total: int, start: int):
    """A tqdm bar on a terminal; otherwise a line every ~10 % of the run (process 0 only)."""
    if not is_main():
        return lambda *_: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

        def update(step, row):
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=_rate(row["tokens_per_s"]),
                            trained_tok_s=_rate(row["target_tokens_per_s"]))
            if step == total:
                bar.close()

        return update
    every = max(1, total // 10)

    def update(step, row):
        if step % every == 0 or step == total or step == start + 1:
            print(f"step {step}/{total} loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3f} lr {row['lr']:.2e} "
                  f"{_rate(row['tokens_per_s'])} tok/s ({_rate(row['target_tokens_per_s'])} trained on)",
                  file=sys.stderr, flush=True)

    return update
