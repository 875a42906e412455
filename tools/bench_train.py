#!/usr/bin/env python3
"""LoRA train-step throughput: ours (jitted JAX step, built as the Trainer builds it) vs transformers + peft.

    python tools/bench_train.py --preset smollm2-135m [--seq 256 --batch 4 --rank 8 --steps 10 --warmup 3]
        [--dtype float32|bfloat16] [--remat none|full|dots] [--attention auto|xla|cudnn] [--json OUT]
        [--response-fraction F] [--only ours|torch] [--rounds N] [--no-doc]

Both sides train the same model (``smollm2-135m``: SmolLM2-135M-Instruct real weights imported from its GGUF;
``mistral-7b``: random weights of Mistral-7B's shape, meant for a GPU; ``tiny``: the tiny preset's shape, random),
the same LoRA (rank r, alpha 2r, dropout 0.05, all 7 projections, fp32 factors on a frozen base in ``--dtype``),
the same batch of random token ids, AdamW (lr 2e-4, wd 0.01) with global-norm clipping 1.0. Every token is in the
loss (pretraining), unless ``--response-fraction F`` puts only each row's last F of its tokens there (a fine-tuning
batch: ours runs the Trainer's fine-tuning step, whose LM head runs on the loss tokens alone; torch labels the
prompt -100, as the authors' HF Trainer does). Each side runs in
its own child process (one after the other), so its peak memory is its own; the reported time is the median of
``--steps`` steps after ``--warmup`` steps (ours is compiled ahead of time; its compile time is reported apart).
``--rounds N`` repeats the pair N times, alternating which side goes first, and reports the median over all
rounds' steps and each round's ratio (a shared machine's drift then hits both sides alike). MFU counts model
FLOPs (``lora_train_flops_per_token``: the forward, the input gradients, the LoRA factors' weight gradients; no
weight gradient of a frozen weight) against the device's dense bf16 peak; recomputation under ``--remat`` is not
counted (full remat makes the hardware do about 1.5× the counted work), as MFU conventionally is. With
``--response-fraction F`` the LM head is counted for the loss tokens alone (the only ones the loss needs; torch runs
it on every token, ours on those), on both sides.

Prints a table, writes ``--json OUT``, and appends a row to ``docs/benchmarks.md`` (unless ``--no-doc``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, even where another copy is installed

DOC = os.path.join(ROOT, "docs", "benchmarks.md")
PRESETS = ("smollm2-135m", "mistral-7b", "tiny")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TORCH_MALLOC_HELP = ("glibc allocation for the torch side: system = glibc's defaults, as the authors' scripts run "
                     "(default); keep = the setting this package applies to itself on the CPU (hostmem.py)")
HF_TARGETS = [f"{t}_proj" for t in TARGETS]


# --------------------------------------------------------------------------------------------------- machine info

def machine() -> str:
    """``CPU model (family F model M), N cores, vector extensions`` (+ GPU name when JAX or torch sees one): the
    model name alone does not tell two generations of a VM's CPU apart (an "AMD EPYC" may be Zen 3 or Zen 5)."""
    cpu, info = platform.processor() or platform.machine(), {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name", cpu)
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']} model {info['model']})"
    flags = set(info.get("flags", "").split())
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    out = ", ".join([cpu, f"{os.cpu_count()} cores", *isa])
    gpu = gpu_name()
    return f"{out}, {gpu}" if gpu else out


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (which waits for its own result) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_name() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def rss_now() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_avg() -> str:
    try:
        return " ".join(open("/proc/loadavg", encoding="utf-8").read().split()[:3])
    except OSError:
        return "?"


def warn_if_busy() -> None:
    """A warning on stderr when other work already loads the machine: on a busy CPU, torch's thread pool (one
    thread per core, spinning) slows far more than XLA's, and the ratios mean little."""
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {busy:.2f} on {os.cpu_count()} cores before the run; other work skews "
              "the ratios (torch's threads suffer most)", file=sys.stderr)


def cpu_busy_s() -> float | None:
    """Seconds of CPU every process on the machine has used since boot (``/proc/stat``: all but idle and iowait),
    or None where there is no such file."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


OTHERS_CPU_LIMIT = 0.10  # others' share of the machine's CPU during a side above which its timing is flagged


def others_cpu_share(busy0: float | None, busy1: float | None, child_cpu_s: float, wall_s: float) -> float | None:
    """The share of the machine's CPU time that processes other than the benchmarked child used while it ran: on
    a shared CPU, torch's spinning thread pool slows far more than XLA's under such load, so a ratio measured then
    says little."""
    if busy0 is None or busy1 is None or wall_s <= 0:
        return None
    return max(0.0, (busy1 - busy0 - child_cpu_s) / (wall_s * (os.cpu_count() or 1)))


def contention_note(res: dict) -> str:
    """``; others used 23% of the CPU during hf-single`` for the sides measured above ``OTHERS_CPU_LIMIT``."""
    busy = [f"{100 * r['others_cpu']:.0f}% during {side}" for side, r in res.items()
            if (r.get("others_cpu") or 0) > OTHERS_CPU_LIMIT]
    return f"; other processes used {', '.join(busy)} of the CPU: ratios unreliable" if busy else ""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_smollm2_dir(p: argparse.ArgumentParser, args) -> None:
    """One clear argparse error when ``--smollm2-dir`` is no imported SmolLM2 folder."""
    d = args.smollm2_dir
    if args.preset == "smollm2-135m" and d and not os.path.isfile(os.path.join(d, "config.json")):
        p.error(f"--smollm2-dir {d}: no config.json there (make one: python tools/import_gguf.py --out {d})")


def check_json_out(p: argparse.ArgumentParser, path: str | None) -> None:
    """One clear argparse error, before any work, when ``--json`` cannot be written (a folder, no parent folder)."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not path.strip() or os.path.isdir(path):
        p.error(f"--json {path!r}: name a file, not a folder")
    if not os.path.isdir(parent):
        p.error(f"--json {path}: the folder {parent} does not exist")
    try:  # a folder that exists but cannot be written would lose the results after the whole run
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".bench-json-check-"):
            pass
    except OSError as e:
        p.error(f"--json {path}: cannot write in {parent} ({e.strerror or e})")


def resolve_dtype_and_attention(p: argparse.ArgumentParser, args) -> None:
    """``--dtype`` defaults to bfloat16 for ``mistral-7b`` (its GPU benchmark) and float32 otherwise; ``--attention
    cudnn`` without a GPU and a bf16 dtype is one error before any side runs (it was a traceback in one child)."""
    if args.dtype is None:
        args.dtype = "bfloat16" if args.preset == "mistral-7b" else "float32"
    if args.attention == "cudnn" and (args.dtype != "bfloat16" or gpu_name() is None):
        p.error("--attention cudnn (cuDNN flash attention) needs an NVIDIA GPU and --dtype bfloat16; use auto or xla")


def write_json(path: str, obj) -> None:
    """``obj`` as strict JSON (NaN / inf as null), written atomically (temp file beside it, then renamed)."""
    from cancerllm_jax.train.run_io import write_text_atomic

    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))


def md_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a ``|`` would split the cell, even inside a code span)."""
    return text.replace("|", "\\|").replace("\n", " ")


def json_safe(obj):
    """``obj`` with NaN / infinite floats as None, so ``--json`` files are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def torch_remat(remat: str) -> str:
    """What the torch side recomputes for our ``--remat``: transformers has one policy, gradient checkpointing of
    whole layers, so ``dots`` (ours keeps the matmul outputs) is ``full`` there, and recorded as such."""
    return "none" if remat == "none" else "full"


# ------------------------------------------------------------------------------------------------------ models

def smollm2_folder(path: str | None) -> str:
    from cancerllm_jax.checkpoint.gguf import import_gguf

    return path or import_gguf()


def model_config(preset: str, folder: str | None):
    from cancerllm_jax.config import PRESETS as MP
    from cancerllm_jax.config import read_hf_config

    if preset == "smollm2-135m":
        return read_hf_config(folder)
    if preset == "mistral-7b":
        return MP["mistral-7b-v0.1"]
    return MP["tiny"]


def hf_config(cfg):
    """A transformers config object of our ModelConfig's shape (random-weight presets)."""
    import transformers

    from cancerllm_jax.config import to_hf_config

    d = to_hf_config(cfg)
    cls = transformers.MistralConfig if cfg.model_type == "mistral" else transformers.LlamaConfig
    d.pop("architectures", None)
    d.pop("model_type", None)
    return cls(**d)


def loss_share(args) -> float:
    """The share of each row's tokens in the loss, as ``make_batch`` masks them (the FLOP count's LM-head share)."""
    return round(args.response_fraction * args.seq) / args.seq


def make_batch(cfg, batch: int, seq: int, seed: int = 0, response: float = 1.0) -> dict:
    """Random token ids; ``loss_mask`` 1 on each row's last ``round(response × seq)`` targets (a response after its
    prompt, as instruction tuning trains; 1.0: every token, as pretraining)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, min(cfg.vocab_size, 32000), size=(batch, seq + 1), dtype=np.int64)
    mask = np.zeros((batch, seq), np.int64)
    mask[:, seq - round(response * seq):] = 1
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


# -------------------------------------------------------------------------------------------------------- ours

def random_params(cfg, dtype: str):
    """Random base params of ``cfg``'s shape as transformers initialises them (matrices N(0, 0.02), RMSNorm weights
    1), generated on the device in ``dtype`` (no fp32 copy)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cancerllm_jax.model import abstract_model, resolve_dtype

    dt = resolve_dtype(dtype)
    _, state = abstract_model(cfg, None, dtype, dtype)
    pure = nnx.to_pure_dict(state)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    norm = ["norm" in jax.tree_util.keystr(path) for path, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]

    @jax.jit
    def gen(key):
        keys = jax.random.split(key, len(leaves))
        return [jnp.ones(x.shape, dt) if is_norm else (0.02 * jax.random.normal(k, x.shape, dt)).astype(dt)
                for k, x, is_norm in zip(keys, leaves, norm)]

    return jax.tree.unflatten(treedef, gen(jax.random.PRNGKey(0)))


def build_ours(args, cfg, folder):
    """``(jitted step, state, frozen, batch, load seconds)`` built as the Trainer builds them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cancerllm_jax.config import LoRAConfig
    from cancerllm_jax.model import model_from_params
    from cancerllm_jax.train.optim import OptimConfig, make_optimizer, schedule
    from cancerllm_jax.train.step import ModelParts, make_train_step, unstack_layers, use_per_layer_weights

    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05, targets=TARGETS)
    t0 = time.perf_counter()
    if args.preset == "smollm2-135m":
        from cancerllm_jax.checkpoint.hf import read_hf

        _, params = read_hf(folder)
    else:
        params = random_params(cfg, args.dtype)
    model = model_from_params(cfg, params, lora, args.dtype, args.dtype, args.remat, lora_seed=0,
                              attention=args.attention)
    del params
    load_s = time.perf_counter() - t0
    # as the Trainer does: LoRA factors trainable, the base frozen, one pure step jitted with the state donated
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    parts = ModelParts(graphdef, trainable, frozen)
    params, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    del model, trainable
    choice = {"auto": "auto", "yes": "per_layer", "no": "stacked"}[args.unstack]
    if use_per_layer_weights(choice, args.remat):
        frozen = unstack_layers(frozen, consume=True)
    ocfg = OptimConfig(lr=2e-4, weight_decay=0.01, warmup_ratio=0.0, schedule="constant", clip_norm=1.0)
    total = args.warmup + args.steps
    tx = make_optimizer(ocfg, total)
    # a fine-tuning batch (--response-fraction < 1) gets the Trainer's fine-tuning step: the LM head on the loss
    # tokens alone
    step_fn = make_train_step(parts, tx, schedule(ocfg, total), 1, use_dropout=True,
                              loss_tokens_only=args.response_fraction < 1)
    step = jax.jit(step_fn, donate_argnums=(0,))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}
    raw = make_batch(cfg, args.batch, args.seq, response=args.response_fraction)
    b, t = raw["inputs"].shape
    batch = {"inputs": jnp.asarray(raw["inputs"], jnp.int32), "targets": jnp.asarray(raw["targets"], jnp.int32),
             "loss_mask": jnp.asarray(raw["loss_mask"], jnp.int32), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    return step, state, frozen, batch, load_s


def run_ours(args, cfg, folder) -> dict:
    import jax

    from cancerllm_jax.flops import lora_train_flops_per_token, mfu_peak

    import cancerllm_jax

    step, state, frozen, batch, load_s = build_ours(args, cfg, folder)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    times, losses, rss_steps = [], [], 0
    total = args.warmup + args.steps
    for i in range(total):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        loss = float(jax.block_until_ready(metrics["loss"]))
        dt = time.perf_counter() - t0
        losses.append(loss)
        rss_steps = max(rss_steps, rss_now())
        if i >= args.warmup:
            times.append(dt)
    out = summarise(args, cfg, times, losses)
    out["host_memory_kept"] = cancerllm_jax.HOST_MEMORY_KEPT
    out.update(compile_s=compile_s, load_s=load_s, peak_rss=rss_peak(), rss_during_steps=rss_steps,
               backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               attention=model_attention(cfg, args))
    analysis = compiled.memory_analysis()  # the step's buffers as XLA assigned them: free of run-to-run noise
    if analysis is not None:
        out["compiled_temp_bytes"] = int(analysis.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats:
        out["device_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    peak = mfu_peak(jax.devices()[0].device_kind, args.dtype)
    flops = lora_train_flops_per_token(cfg, args.seq, args.rank, TARGETS, loss_share(args))
    out["flops_per_token"] = flops
    out["gflops"] = flops * out["tokens_per_s"] / 1e9
    if peak:
        out["mfu"] = flops * out["tokens_per_s"] / peak
    return out


# ------------------------------------------------------------------------------------------------------- torch

def run_torch(args, cfg, folder) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cancerllm_jax.flops import lora_train_flops_per_token, mfu_peak

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.preset == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=tdt, local_files_only=True)
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=tdt)
    model.to(dev)
    model.config.use_cache = False
    if torch_remat(args.remat) == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    pcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=HF_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, pcfg)
    # fp32 factors on the frozen base, stored as ours (and HF Trainer + autocast); under autocast peft's LoRA
    # products then run in bf16, where ours compute them in fp32 (LoRA is ~0.4 % of a 7B step's FLOPs)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    raw = make_batch(cfg, args.batch, args.seq, response=args.response_fraction)
    inputs = torch.as_tensor(raw["inputs"], device=dev)
    # the prompt's targets -100, as the authors' HF Trainer labels them (cross_entropy's default ignore_index)
    labels = torch.as_tensor(raw["targets"], device=dev)
    labels = labels.masked_fill(torch.as_tensor(raw["loss_mask"], device=dev) == 0, -100)
    total = args.warmup + args.steps
    times, losses, rss_steps = [], [], 0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(total):
        t0 = time.perf_counter()
        # lm-head in the base dtype; a mixed-dtype (fp32 LoRA on bf16 base) forward runs under autocast
        with torch.autocast(dev, dtype=tdt, enabled=args.dtype != "float32"):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        losses.append(float(loss.detach()))
        dt = time.perf_counter() - t0
        rss_steps = max(rss_steps, rss_now())
        if i >= args.warmup:
            times.append(dt)
    out = summarise(args, cfg, times, losses)
    import cancerllm_jax

    out.update(load_s=load_s, peak_rss=rss_peak(), rss_during_steps=rss_steps, backend=dev,
               threads=torch.get_num_threads(), host_memory_kept=cancerllm_jax.HOST_MEMORY_KEPT,
               remat=torch_remat(args.remat))
    out["flops_per_token"] = lora_train_flops_per_token(cfg, args.seq, args.rank, TARGETS, loss_share(args))
    if dev == "cuda":
        out["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        peak = mfu_peak(torch.cuda.get_device_name(0), args.dtype)
        if peak:
            out["mfu"] = out["flops_per_token"] * out["tokens_per_s"] / peak
    out["gflops"] = out["flops_per_token"] * out["tokens_per_s"] / 1e9
    return out


def model_attention(cfg, args) -> str:
    from cancerllm_jax.model import resolve_dtype
    from cancerllm_jax.model.mistral import resolve_attention

    return resolve_attention(args.attention, resolve_dtype(args.dtype), cfg.head_dim)


def summarise(args, cfg, times, losses) -> dict:
    med = statistics.median(times)
    return {"ms_per_step": 1e3 * med, "tokens_per_s": args.batch * args.seq / med,
            "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times), "steps_timed": len(times),
            "first_loss": losses[0], "last_loss": losses[-1], "step_s": list(times)}


def combine_rounds(rounds: list[dict], tokens_per_step: int) -> dict:
    """One side's results from several rounds as one: the median over every timed step of every round (GFLOP/s
    and MFU rescaled to it), the peak memory of the worst round, the median compile time, and each round's own
    ms/step under ``round_ms_per_step``."""
    if len(rounds) == 1:
        return rounds[0]
    times = [t for r in rounds for t in r["step_s"]]
    med = statistics.median(times)
    out = dict(rounds[0])
    out.update(ms_per_step=1e3 * med, tokens_per_s=tokens_per_step / med, ms_min=1e3 * min(times),
               ms_max=1e3 * max(times), steps_timed=len(times), step_s=times, last_loss=rounds[-1]["last_loss"],
               rounds=len(rounds), round_ms_per_step=[r["ms_per_step"] for r in rounds])
    scale = out["tokens_per_s"] / rounds[0]["tokens_per_s"]
    for key in ("gflops", "mfu"):
        if key in out:
            out[key] = rounds[0][key] * scale
    return merge_round_costs(out, rounds)


def merge_round_costs(out: dict, rounds: list[dict]) -> dict:
    """``out`` with the rounds' peak memory (their worst) and compile times (their median)."""
    for key in ("peak_rss", "rss_during_steps", "device_peak_bytes", "compiled_temp_bytes"):
        if key in out:
            out[key] = max(r[key] for r in rounds)
    for key in ("compile_s", "compile_1tok_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rounds)
    shares = [r["others_cpu"] for r in rounds if r.get("others_cpu") is not None]
    if shares:
        out["others_cpu"] = max(shares)  # the busiest round
    return out


def run_rounds(rounds: int, sides: list[str], run_one) -> tuple[dict, int]:
    """Every side ``rounds`` times, their order reversed every other round. ``run_one(side, label)`` runs one
    and returns ``(result, exit code)``; a side that fails is dropped (``run_side`` reports it) and not run
    again. Returns ``({side: [its result per round]}, the last non-zero exit code or 0)``."""
    per_round, failed = {}, 0
    for rnd in range(rounds):
        for side in (sides if rnd % 2 == 0 else sides[::-1]):
            if side in per_round and per_round[side] is None:  # failed in an earlier round
                continue
            result, rc = run_one(side, side if rounds == 1 else f"{side}, round {rnd + 1}")
            if rc:
                failed, per_round[side] = rc, None
            else:
                per_round.setdefault(side, []).append(result)
    return {side: r for side, r in per_round.items() if r}, failed


def round_ratios(per_round: dict, ref: str, ours: str = "ours") -> list[float] | None:
    """``ours`` over ``ref`` (tokens/s) in each round, where there were rounds and both ran every one."""
    a, b = per_round.get(ours), per_round.get(ref)
    if not a or not b or len(a) < 2 or len(a) != len(b):
        return None
    return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b)]


def rounds_note(ratios: list[float] | None) -> str:
    """`` (rounds: 1.02×, 0.97×)`` for a docs cell, or nothing."""
    return " (rounds: " + ", ".join(f"{r:.2f}×" for r in ratios) + ")" if ratios else ""


# -------------------------------------------------------------------------------------------------------- main

def note_failed(args, sides: list[str], res: dict) -> list[str]:
    """The sides that were asked for but failed (each already reported by ``run_side``), also named in the docs
    row's note, so a missing side is never read as one not asked for."""
    failed = [s for s in sides if s not in res]
    if failed:
        print(f"failed sides (no figures): {', '.join(failed)}", file=sys.stderr)
        args.note = "; ".join(x for x in (args.note, "failed: " + ", ".join(failed)) if x)
    return failed


def child(args) -> dict:
    folder = smollm2_folder(args.smollm2_dir) if args.preset == "smollm2-135m" else None
    cfg = model_config(args.preset, folder)
    return (run_ours if args.only == "ours" else run_torch)(args, cfg, folder)


def fmt_mem(r: dict) -> str:
    if "device_peak_bytes" in r:
        return f"{r['device_peak_bytes'] / 2**30:.2f} GiB dev"
    return f"{r['peak_rss'] / 2**30:.2f} GiB RSS"


def fmt_temp(r: dict) -> str:
    """The compiled step's temporaries (ours) for a docs row's cell: deterministic where RSS and times are not."""
    return f", temporaries {r['compiled_temp_bytes'] / 2**30:.2f} GiB" if "compiled_temp_bytes" in r else ""


def table(args, res: dict) -> str:
    lines = [f"{'side':<22}{'tok/s':>10}{'ms/step':>10}{'min..max ms':>18}{'memory':>18}{'GFLOP/s':>10}{'MFU':>8}"
             f"{'compile s':>11}"]
    for side, r in res.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"{side:<22}{r['tokens_per_s']:>10.1f}{r['ms_per_step']:>10.1f}"
                     f"{r['ms_min']:>9.0f}..{r['ms_max']:<7.0f}{fmt_mem(r):>18}{r['gflops']:>10.1f}{mfu:>8}{comp:>11}")
    if "ours" in res and "torch" in res:
        lines.append(f"ratio ours/torch tokens/s: {res['ours']['tokens_per_s'] / res['torch']['tokens_per_s']:.2f}x")
    if "compiled_temp_bytes" in (res.get("ours") or {}):
        lines.append(f"ours: the compiled step's temporaries {res['ours']['compiled_temp_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def append_doc(args, res: dict, command: str, mach: str, load: str, ratios: list | None = None) -> None:
    ours, ref = res.get("ours"), res.get("torch")
    ratio = (f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ours and ref else "-") + rounds_note(ratios)

    def cell(r):
        if not r:
            return "-"
        s = f"{r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.0f} ms, {fmt_mem(r)}"
        if r.get("mfu"):
            s += f", MFU {100 * r['mfu']:.1f}%"
        if "compile_s" in r:
            s += f", compile {r['compile_s']:.1f} s"
        return s + fmt_temp(r)

    busy = contention_note(res)
    row = (f"| {datetime.date.today().isoformat()} | {mach} (load {load}{busy}) | `{md_cell(command)}` | "
           f"{cell(ours)} | {cell(ref)} | {ratio} | {md_cell(args.note or '')} |\n")
    header = "## LoRA train step (tools/bench_train.py)"
    cols = ("| date | machine | command | ours (JAX) | transformers + peft | ratio | note |\n"
            "|---|---|---|---|---|---|---|\n")
    append_row(header, cols, row)


def run_side(cmd: list[str], side: str, out: str, smollm2_dir: str | None,
             host_malloc: str | None = None) -> tuple[dict | None, int]:
    """Run one benchmark side in a child process (its own peak memory); ``(its JSON result, exit code)``.

    ``host_malloc``: ``CANCERLLM_HOST_MALLOC`` for the child (a torch side imports this package for its helpers,
    which would otherwise give torch our CPU allocator setting, see ``cancerllm_jax/hostmem.py``)."""
    if smollm2_dir and "--smollm2-dir" not in cmd:
        cmd = cmd + ["--smollm2-dir", smollm2_dir]
    print(f"[{side}] running ...", file=sys.stderr, flush=True)
    env = dict(os.environ, CANCERLLM_HOST_MALLOC=host_malloc) if host_malloc else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = cpu_busy_s(), time.perf_counter()
    r = subprocess.run(cmd, env=env)
    wall, busy1, after = time.perf_counter() - t0, cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        print(f"[{side}] failed with exit code {r.returncode}", file=sys.stderr)
        return None, r.returncode
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    child_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["others_cpu"] = others_cpu_share(busy0, busy1, child_s, wall)
    if (result["others_cpu"] or 0) > OTHERS_CPU_LIMIT:
        print(f"warning: [{side}] other processes used {100 * result['others_cpu']:.0f}% of the machine's CPU while "
              "it ran: its timing (torch's above all) is unreliable; run again on a quiet machine", file=sys.stderr)
    return result, 0


def append_row(header: str, cols: str, row: str, doc: str = DOC) -> None:
    """Append ``row`` to the table under ``header`` in docs/benchmarks.md (creating the section with ``cols``)."""
    text = open(doc, encoding="utf-8").read() if os.path.isfile(doc) else "# Benchmarks\n"
    if header not in text:
        text = text.rstrip("\n") + f"\n\n{header}\n\n" + cols + row
    else:
        # append at the end of this section's table
        start = text.index(header)
        nxt = text.find("\n## ", start + len(header))
        section = text[start:] if nxt < 0 else text[start:nxt]
        section = section.rstrip("\n") + "\n" + row
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt:])
    from cancerllm_jax.train.run_io import write_text_atomic

    write_text_atomic(doc, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS, default="smollm2-135m")
    p.add_argument("--seq", type=positive_int, default=256)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="base weights and compute (default: bfloat16 for mistral-7b, float32 otherwise)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--unstack", choices=("auto", "no", "yes"), default="auto",
                   help="ours: yes = the frozen layer weights as one array per layer and the layers as a Python loop "
                        "(train.step.unstack_layers; no per-layer weight-slice copies), no = the scan over stacked "
                        "weights; auto = as the Trainer's layer_weights=auto (yes on a GPU without remat)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="our attention: auto = cuDNN flash attention on a GPU in bf16, else the explicit-mask einsum")
    p.add_argument("--response-fraction", type=float, default=1.0,
                   help="the loss on each row's last fraction of tokens (a response after its prompt), as instruction "
                        "tuning trains: ours then runs the Trainer's fine-tuning step (the LM head on the loss "
                        "tokens alone), torch the authors' (labels -100 on the prompt); 1.0 (default): every token, "
                        "as pretraining")
    p.add_argument("--only", choices=("ours", "torch"))
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="run the two sides this many times, alternating which goes first, and report the median "
                        "over every round's steps (and each round's ratio): drift of a shared machine then hits "
                        "both sides alike")
    p.add_argument("--torch-host-malloc", choices=("system", "keep"), default="system", help=TORCH_MALLOC_HELP)
    p.add_argument("--smollm2-dir", help="an imported SmolLM2 HF folder (default: import the GGUF into the cache)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-doc", action="store_true", help="do not append a row to docs/benchmarks.md")
    p.add_argument("--note", help="a note for the docs row")
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.response_fraction <= 1 or round(args.response_fraction * args.seq) < 1:
        p.error(f"--response-fraction must be in (0, 1] and leave at least one loss token per row, got "
                f"{args.response_fraction}")
    check_smollm2_dir(p, args)
    check_json_out(p, args.json)
    resolve_dtype_and_attention(p, args)

    if args.child_out:  # one side, in its own process
        res = child(args)
        with open(args.child_out, "w", encoding="utf-8") as f:
            json.dump(res, f)
        return 0

    if args.preset == "smollm2-135m":
        args.smollm2_dir = smollm2_folder(args.smollm2_dir)  # import once, before the children
    command = "python tools/bench_train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    sides = [args.only] if args.only else ["ours", "torch"]
    child_argv = list(argv or sys.argv[1:])  # a child ignores --rounds, --json and the docs row
    warn_if_busy()
    load_before = load_avg()

    def run_one(side, label):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), *child_argv, "--only", side, "--child-out", path]
        try:
            return run_side(cmd, label, path, args.smollm2_dir, args.torch_host_malloc if side == "torch" else None)
        finally:
            os.unlink(path)

    per_round, failed = run_rounds(args.rounds, sides, run_one)
    res = {side: combine_rounds(r, args.batch * args.seq) for side, r in per_round.items()}
    ratios = round_ratios(per_round, "torch")
    if not res:
        return failed
    failed_sides = note_failed(args, sides, res)
    load = f"{load_before} → {load_avg()}"
    mach = machine()
    print(f"machine: {mach}; load avg {load}{contention_note(res)}")
    remat = args.remat + (f" (torch: {torch_remat(args.remat)})" if "torch" in res and args.remat == "dots" else "")
    print(f"preset {args.preset}, batch {args.batch} x seq {args.seq}, LoRA r={args.rank} on 7 projections, "
          f"dtype {args.dtype}, remat {remat}, median of {args.steps * args.rounds} steps "
          f"({args.rounds} round(s) of {args.steps}, each after {args.warmup} warm-up)")
    print(table(args, res))
    if ratios:
        print("ratio per round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    out = {"preset": args.preset, "seq": args.seq, "batch": args.batch, "rank": args.rank, "dtype": args.dtype,
           "remat": args.remat, "unstack": args.unstack, "attention": args.attention,
           "response_fraction": args.response_fraction, "steps": args.steps, "warmup": args.warmup,
           "rounds": args.rounds, "machine": mach,
           "load": load, "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
           "results": res}
    if "ours" in res and "torch" in res:
        out["ratio"] = res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
    if ratios:
        out["round_ratios"] = ratios
    if failed_sides:
        out["failed_sides"] = failed_sides
    if args.json:
        write_json(args.json, out)
    if not args.no_doc:
        append_doc(args, res, command, mach, load, ratios)
    return failed


if __name__ == "__main__":
    sys.exit(main())
