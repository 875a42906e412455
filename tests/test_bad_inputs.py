"""A catalogue of bad inputs across every CLI and the front door.

Each CLI case: a non-zero exit, exactly one ``error: ...`` line on stderr naming the file, line or field (checked by
the case's needles), no traceback, and nothing half-written (the case's output paths do not exist afterwards).
CLIs run in-process (``main(argv)``; SystemExit caught) for speed; two subprocess cases check the real process
and ``--debug``. Front-door cases check the exception type and message.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import jax

import cancerllm_jax as cj
from cancerllm_jax.errors import UserError
from helpers import cli_module as _module, one_clear_error, run_cli

# Start the backend now with conftest's 10 host devices: otherwise the first in-process launcher (mesh 1x1) would
# ask for 1 device before JAX starts and every later mesh case would see a 1-device host.
assert jax.device_count() >= 10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--mesh", "1x1", "--steps", "2", "--batch-size", "2", "data.block_size=32", "synthetic_documents=20",
        "lora.rank=2", "data.eval_fraction=0"]


def tiny_less(extra):
    """TINY less the settings ``extra`` gives (a setting given twice with other values is refused)."""
    keys = {a.split("=", 1)[0] for a in extra if isinstance(a, str) and "=" in a and not a.startswith("--")}
    out, skip = [], False
    for a in TINY:
        if skip:
            skip = False
        elif a.startswith("--") and a[2:].replace("-", "_") in keys:
            skip = True
        elif "=" not in a or a.split("=", 1)[0] not in keys:
            out.append(a)
    return out


def nothing_left(*paths):
    for p in paths:
        assert not os.path.exists(p), f"{p} was left behind"


def no_temp_files(folder):
    left = [n for n in os.listdir(folder) if ".tmp" in n]
    assert not left, left


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``tok``: a tiny random Mistral with the Mistral v1 vocabulary (32000) and its tokenizer.model beside it;
    ``small``: vocabulary 96 and no tokenizer."""
    import torch
    import transformers

    from cancerllm_jax.data.tokenizer import mistral_v1_model_file

    out = {}
    for name, vocab in (("tok", 32000), ("small", 96)):
        torch.manual_seed(0)
        cfg = transformers.MistralConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         sliding_window=64, bos_token_id=1, eos_token_id=2)
        folder = str(tmp_path_factory.mktemp(name))
        transformers.MistralForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
        if name == "tok":
            shutil.copy(mistral_v1_model_file(), os.path.join(folder, "tokenizer.model"))
        out[name] = folder
    return out


def write(path, data) -> str:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(data)
    return str(path)


def tear_orbax_data(folder) -> None:
    """Cut every Orbax data file under ``folder`` short, as torn writes would."""
    data = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if os.path.basename(d) == "d"]
    assert data
    for path in data:
        write(path, open(path, "rb").read()[:20])


# ------------------------------------------------------------------------------ launch/pretrain.py: bad data

TEN_MB = 10 * 1024 * 1024
PRETRAIN_DATA = {
    "malformed": ('{"text": "a fine note"}\n{"text": broken}\n', ["malformed.jsonl:2", "invalid JSON"]),
    "truncated": ('{"text": "a fine note"}\n{"text": "cut off in the mid', ["truncated.jsonl:2", "invalid JSON"]),
    "wrong_type": ('{"text": 42}\n', ["wrong_type.jsonl:1", "'text'", "string"]),
    "missing_field": ('{"txt": "note"}\n', ["missing_field.jsonl:1", "'text'"]),
    "not_object": ('["text"]\n', ["not_object.jsonl:1", "JSON object"]),
    "empty": ("", ["empty.jsonl", "no records"]),
    "blank_lines_only": ("\n\n  \n", ["blank_lines_only.jsonl", "no records"]),
    "non_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9 \xff"}\n', ["non_utf8.jsonl:2", "UTF-8"]),
    # one 10 MB line: parsed in well under a second and refused with its line, never a hang
    "lone_surrogate": ('{"text": "a note \\ud800 cut"}\n', ["lone_surrogate.jsonl:1", "surrogate"]),
    "ten_mb_line_bad_json": ('{"text": "' + "x" * TEN_MB, ["ten_mb_line_bad_json.jsonl:1", "invalid JSON"]),
    "ten_mb_line_wrong_type": ('{"text": ["' + "x" * TEN_MB + '"]}\n', ["ten_mb_line_wrong_type.jsonl:1", "'text'"]),
    "txt_non_utf8": (b"Reason for visit: f/u\n\xff\xfe bad bytes\n", ["txt_non_utf8.txt:2", "UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_DATA))
def test_pretrain_bad_data(case, tmp_path, capsys):
    text, needles = PRETRAIN_DATA[case]
    path = write(tmp_path / (case + (".txt" if case.startswith("txt") else ".jsonl")), text)
    wd = tmp_path / "run"
    code, err = run_cli("launch/pretrain.py", ["--data", path, "--workdir", wd, *TINY], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(wd)  # bad data leaves no run behind


PRETRAIN_ARGS = {
    "typo_override": (["lora.rnak=4"], ["rnak", "did you mean 'rank'"]),
    "unknown_section": (["optimm.lr=1"], ["optimm", "did you mean 'optim'"]),
    # HF TrainingArguments / peft names of our keys (difflib found none of these)
    "hf_learning_rate": (["optim.learning_rate=1e-4"], ["learning_rate", "did you mean 'lr'"]),
    "peft_r": (["lora.r=8"], ["'r'", "did you mean 'rank'"]),
    "hf_max_grad_norm": (["optim.max_grad_norm=1"], ["max_grad_norm", "did you mean 'clip_norm'"]),
    "hf_name_misspelt": (["optim.learning_rat=1e-4"], ["learning_rat", "did you mean 'lr'"]),  # was no hint
    "seq_len_of_finetune": (["data.max_seq_len=64"], ["max_seq_len", "did you mean 'block_size'"]),
    "key_of_a_section": (["lr=1e-4"], ["'lr'", "did you mean 'optim.lr'"]),  # was "did you mean 'lora'"
    "hf_key_of_a_section": (["learning_rate=1e-4"], ["did you mean 'optim.lr'"]),
    "bad_value_type": (["optim.lr=fast"], ["optim.lr", "'fast'"]),
    "mesh_string": (["--mesh", "10by1"], ["10by1"]),
    "mesh_negative": (["--mesh", "-1x2"], ["mesh '-1x2'", "positive integers"]),  # was argparse's "expected one"
    "mesh_too_big": (["--mesh", "4x5"], ["4x5", "20 devices"]),
    "mesh_absurd": (["--mesh", "100000x1"], ["100000 devices", "at most"]),
    "workdir_is_a_file": (["--workdir", "__FILE__"], ["is a file"]),
    "batch_not_divisible": (["--mesh", "2x1", "--batch-size", "3"], ["not divisible", "2x1"]),
    "grad_accum_not_dividing": (["optim.grad_accum=3"], ["grad_accum"]),
    "missing_data_file": (["--data", "/nonexistent/notes.jsonl"], ["/nonexistent/notes.jsonl", "no such file"]),
    "unsupported_extension": (["--data", "__CSV__"], ["unsupported file type"]),
    "unknown_model_preset": (["model=tiyn"], ["tiyn"]),
    # invalid numbers: refused by the typed config, so also by --dry-run (which builds no data)
    "block_size_zero_dry_run": (["--dry-run", "data.block_size=0"], ["data.block_size", "at least 2"]),
    "block_size_negative_dry_run": (["--dry-run", "data.block_size=-8"], ["data.block_size", "at least 2"]),
    "lr_negative": (["optim.lr=-1"], ["optim.lr", "positive", "-1"]),
    "lr_zero_dry_run": (["--dry-run", "optim.lr=0"], ["optim.lr", "positive"]),
    "warmup_negative": (["optim.warmup_ratio=-0.1"], ["optim.warmup_ratio"]),
    "weight_decay_negative": (["optim.weight_decay=-0.01"], ["optim.weight_decay", ">= 0"]),
    "clip_norm_negative": (["optim.clip_norm=-1"], ["optim.clip_norm", ">= 0"]),
    "beta_one": (["optim.b2=1"], ["optim.b2", "[0, 1)"]),
    "eps_zero": (["optim.eps=0"], ["optim.eps", "positive"]),  # was a NaN at step 2 blaming the lr
    "steps_and_epochs_on_the_command_line": (["--epochs", "1"], ["steps (2)", "epochs (1)", "pass one of the two"]),
    "lora_rank_zero": (["lora.rank=0"], ["lora.rank", "positive"]),
    "lora_targets_empty": (["lora.targets="], ["lora.targets", "empty"]),
    "lora_targets_capital": (["lora.targets=Q,v"], ["lora.targets", "'Q'", "did you mean 'q'"]),
    "lora_section_zero": (["lora=0"], ["config.lora", "mapping"]),
    "lora_alpha_zero": (["lora.alpha=0"], ["lora.alpha", "positive"]),
    "lora_alpha_negative": (["lora.alpha=-16"], ["lora.alpha", "positive"]),
    "lora_dropout_one": (["lora.dropout=1"], ["lora.dropout", "[0, 1)"]),
    "steps_zero": (["--steps", "0"], ["steps", ">= 1"]),
    "seed_too_big": (["--seed", str(2**32 + 5)], ["seed", "2**32"]),
    "batch_size_zero": (["--batch-size", "0"], ["batch_size", ">= 1"]),
    # huge counts: one line, not an OverflowError inside XLA (or, for the batch, the process aborting in C++)
    "steps_huge": (["--dry-run", "steps=99999999999999999999999999"], ["steps", "2**31 - 1"]),
    "batch_size_huge": (["--dry-run", "--batch-size", str(2**31)], ["batch_size", "2**31 - 1"]),
    "tokens_per_step_huge": (["--dry-run", "data.block_size=2000000000"], ["data.block_size", "2**31 - 1"]),
    "synthetic_documents_zero_dry_run": (["--dry-run", "synthetic_documents=0"], ["synthetic_documents", ">= 1"]),
    "num_processes_negative": (["--dry-run", "--num-processes", "-2"], ["--num-processes", "at least 1"]),
    "process_id_out_of_range": (["--dry-run", "--process-id", "5"], ["--process-id", "0 … 0"]),
    # a malformed coordinator crashed inside JAX (IndexError, a segfault)
    **{f"coordinator_{name}": (["--dry-run", "--coordinator", value, "--num-processes", "2", "--process-id", "0"],
                               [f"coordinator {value!r}: expected HOST:PORT"])
       for name, value in (("no_port", "localhost"), ("port_text", "localhost:abc"), ("port_zero", "h:0"),
                           ("no_host", ":1234"), ("port_too_big", "h:70000"))},
    "coordinator_ipv6_without_brackets": (["--dry-run", "--coordinator", "::1", "--num-processes", "2",
                                           "--process-id", "0"], ["coordinator '::1'", "[ADDRESS]:PORT"]),
    "coordinator_ipv6_without_port": (["--dry-run", "--coordinator", "[::1]", "--num-processes", "2",
                                       "--process-id", "0"], ["coordinator '[::1]': expected HOST:PORT"]),
    "coordinator_for_one_process": (["--dry-run", "--coordinator", "h:1234", "--num-processes", "1"],
                                    ["leave --coordinator out to run this process alone"]),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_ARGS))
def test_pretrain_bad_arguments(case, tmp_path, capsys):
    extra, needles = PRETRAIN_ARGS[case]
    extra = [write(tmp_path / "notes.csv", "text\nnote\n") if a == "__CSV__" else a for a in extra]
    extra = [write(tmp_path / "a_file", "x") if a == "__FILE__" else a for a in extra]
    wd = tmp_path / "run"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *tiny_less(extra), *extra], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(wd)


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_process_count_in_the_environment_is_one_clear_error(value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CANCERLLM_NUM_PROCESSES", value)
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--dry-run"], capsys)
    one_clear_error(code, err, "CANCERLLM_NUM_PROCESSES" if value == "abc" else "at least 1", value)


def test_cluster_launcher_variables_start_a_multi_host_run_or_say_what_is_missing(tmp_path, capsys, monkeypatch):
    """Under srun / mpirun each task used to train alone into the same workdir. The task count and rank come from
    the launcher's variables and the coordinator from JAX_COORDINATOR_ADDRESS; without it, one error. A process whose
    coordinator never answers stops with one error naming it (JAX aborted it with a C++ stack trace)."""
    import socket

    for count, rank in (("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        with monkeypatch.context() as m:
            m.setenv(count, "2")
            m.setenv(rank, "1")
            code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--dry-run"], capsys)
            one_clear_error(code, err, f"({count}=2) needs a coordinator", "JAX_COORDINATOR_ADDRESS",
                            "--num-processes 1 runs this process alone")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # a count without its rank: the rank is what is missing
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--dry-run"], capsys)
    one_clear_error(code, err, "(JAX_NUM_PROCESSES=2) needs a process id (--process-id I or JAX_PROCESS_ID)")
    assert "needs a coordinator" not in err
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with socket.socket() as s:  # a free port: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setenv("CANCERLLM_INIT_TIMEOUT", "1")
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--mesh", "2x1", "--dry-run"],
                        capsys)
    one_clear_error(code, err, f"cannot reach the coordinator 127.0.0.1:{port} after 1 s", "start process 0")
    with socket.socket() as busy:  # process 0 on a port in use: JAX segfaulted
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        monkeypatch.setenv("SLURM_PROCID", "0")
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{busy.getsockname()[1]}")
        code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--mesh", "2x1", "--dry-run"],
                            capsys)
        one_clear_error(code, err, f"port {busy.getsockname()[1]} is in use")
    monkeypatch.setenv("SLURM_PROCID", "2")
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--dry-run"], capsys)
    one_clear_error(code, err, "SLURM_PROCID must be in 0 … 1 (SLURM_STEP_NUM_TASKS 2), got 2")
    nothing_left(tmp_path / "r")


def test_a_coordinator_port_left_in_time_wait_by_a_dead_run_is_free():
    """The port check binds as gRPC does (SO_REUSEADDR): a port whose last coordinator just died (its connections in
    TIME_WAIT) is free for the restarted run, and a listening one is not."""
    import socket
    import time

    from cancerllm_jax.launch_common import check_coordinator_port_free

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    with pytest.raises(UserError, match=f"port {port} is in use"):
        check_coordinator_port_free(port)
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server's end closes first: it stays in TIME_WAIT on the port
    time.sleep(0.1)
    cli.close()
    srv.close()
    check_coordinator_port_free(port)


def test_pretrain_yaml_typo_suggests_the_key(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", "lora:\n  rank: 4\n  alpah: 8\n")
    code, err = run_cli("launch/pretrain.py", ["--config", cfg, "--workdir", tmp_path / "r", *TINY], capsys)
    one_clear_error(code, err, "alpah", "did you mean 'alpha'")
    cfg = write(tmp_path / "c.yaml", "lr: 0.001\n")  # a section's key at the top: was "did you mean 'lora'"
    code, err = run_cli("launch/pretrain.py", ["--config", cfg, "--workdir", tmp_path / "r", *TINY], capsys)
    one_clear_error(code, err, "'lr'", "did you mean 'optim.lr'")


def test_a_yaml_section_keeps_the_defaults_it_does_not_name(tmp_path):
    """``optim: {lr: ...}`` in a fine-tuning YAML changes the lr only: the task's clip 0.3, linear schedule, no
    weight decay and LoRA dropout 0.1 stay (not the generic OptimConfig / LoRAConfig defaults); overrides alike."""
    from cancerllm_jax.train.config import resolve
    from cancerllm_jax.train.finetune import FinetuneConfig

    default = FinetuneConfig()
    cfg_file = write(tmp_path / "c.yaml", "optim:\n  lr: 1.0e-4\nlora:\n  rank: 16\ndata:\n  eval_path: null\n")
    for cfg in (resolve(FinetuneConfig, cfg_file, []), resolve(FinetuneConfig, None, ["optim={lr: 1.0e-4}",
                                                                                       "lora={rank: 16}"])):
        assert cfg.optim == dataclasses.replace(default.optim, lr=1e-4)
        assert cfg.lora == dataclasses.replace(default.lora, rank=16)
        assert cfg.data.max_seq_len == default.data.max_seq_len


def test_an_empty_yaml_section_keeps_the_defaults_section(tmp_path):
    """``lora:`` with its keys commented out (YAML null), or ``optim=null``, keeps the config type's own section (the
    fine-tuning LoRA r 64 / clip 0.3, the pretraining block 128), not the generic class defaults it silently got."""
    from cancerllm_jax.train.config import PretrainConfig, resolve
    from cancerllm_jax.train.finetune import FinetuneConfig

    cfg_file = write(tmp_path / "c.yaml", "lora:\n  # rank: 32\noptim:\n  # lr: 1.0e-4\ndata:\n")
    for cls in (FinetuneConfig, PretrainConfig):
        default = cls()
        for cfg in (resolve(cls, cfg_file, []), resolve(cls, None, ["optim=null", "lora=null", "data=null"])):
            assert (cfg.lora, cfg.optim, cfg.data) == (default.lora, default.optim, default.data)


def test_steps_on_the_command_line_win_over_the_configs_epochs(tmp_path, capsys):
    """The 7B YAML sets ``epochs: 1`` (and ``steps`` for --dry-run) and its usage says ``steps=N``: a command-line
    ``steps`` sets the run's length, with a note, and the run records no epochs (it was silently ignored)."""
    from cancerllm_jax.train.run_io import read_run_meta

    cfg_file = write(tmp_path / "c.yaml", "epochs: 1\nsteps: 500\n")
    argv = ["--config", cfg_file, "--workdir", tmp_path / "r", *TINY[2:]]  # TINY less its --mesh: 1x1 is default
    code, err = run_cli("launch/pretrain.py", argv, capsys)
    assert code in (0, None), err
    assert "note: steps=2 on the command line sets the run's length; the config's epochs=1 is ignored" in err
    meta = read_run_meta(str(tmp_path / "r"))
    assert (meta["config"]["steps"], meta["config"]["epochs"]) == (2, None), meta["config"]
    code, err = run_cli("launch/pretrain.py", [*argv[:4], "--dry-run"], capsys)  # the file alone: epochs win
    assert code in (0, None) and "steps of 1 epochs are not known" in err, err


def test_a_workdir_with_someone_elses_files_is_refused(tmp_path, capsys):
    """A folder that holds no run but other files (a project folder, an HF model folder) is refused, naming them:
    the run overwrote its config.yaml / metrics.jsonl and deleted its base/ and tb/ (and cj.load then read the run
    instead of the model). What a run stopped before its run.json leaves is not in the way."""
    wd = tmp_path / "mine"
    (wd / "base").mkdir(parents=True)
    write(wd / "base" / "notes.txt", "precious")
    write(wd / "config.yaml", "mine: 1\n")
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY], capsys)
    one_clear_error(code, err, f"--workdir {wd} holds no run but files a run would overwrite or delete, or a model "
                    "(base, config.yaml)", "give a new or empty folder")
    assert (wd / "base" / "notes.txt").read_text() == "precious" and (wd / "config.yaml").read_text() == "mine: 1\n"
    model = tmp_path / "model"
    write(model.mkdir() or model / "config.json", "{}")
    code, err = run_cli("launch/pretrain.py", ["--workdir", model, *TINY], capsys)
    one_clear_error(code, err, "or a model (config.json)")
    tokenizer_only = tmp_path / "tok"  # a run's base/ holds tokenizer files beside its params, never alone
    write((tokenizer_only / "base").mkdir(parents=True) or tokenizer_only / "base" / "tokenizer.json", "{}")
    code, err = run_cli("launch/pretrain.py", ["--workdir", tokenizer_only, *TINY], capsys)
    one_clear_error(code, err, "(base)")
    assert (tokenizer_only / "base" / "tokenizer.json").read_text() == "{}"
    left = tmp_path / "left"  # a run killed while writing base/ (its lock, an Orbax temp folder), a shell's log
    (left / "base" / "params.orbax-checkpoint-tmp-1").mkdir(parents=True)
    write(left / ".lock", "")
    write(left / "train.log", "the shell's redirect")
    code, err = run_cli("launch/pretrain.py", ["--workdir", left, *TINY], capsys)
    assert code in (0, None), err


def test_a_run_killed_while_starting_again_is_still_a_run(tmp_path, capsys, monkeypatch):
    """A run that never saved a checkpoint starts again; killed while it re-saves its base, it removed its run.json
    first and left config.yaml, metrics.jsonl and tb/: the next start took the folder for someone else's (the crash
    test found it). run.json now stays until the new one replaces it."""
    import shutil

    from cancerllm_jax.train import loop

    wd = tmp_path / "r"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY], capsys)
    assert code in (0, None), err
    shutil.rmtree(wd / "checkpoints")  # as if killed before its first checkpoint

    def killed(self, base_dir):
        raise RuntimeError("killed while saving the base")

    monkeypatch.setattr(loop.Trainer, "_save_base", killed)
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--resume"], capsys)
    assert code not in (0, None) and "killed while saving the base" in err, err
    monkeypatch.undo()
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--resume"], capsys)
    assert code in (0, None), err


def test_finetune_has_no_segment_mask_flag(tmp_path, capsys):
    """``--no-segment-mask`` is pretraining's (packed documents); finetune.py offered it and ignored it."""
    code, err = run_cli("launch/finetune.py", ["--model", "tiny", "--no-segment-mask", "--dry-run"], capsys)
    assert code == 2 and "unrecognized arguments: --no-segment-mask" in err, err


@pytest.mark.parametrize("text, needle", [("lora:\n  rank: [1,\n", "c.yaml:3: invalid YAML"),
                                          (b"lora:\n  rank: \xff\n", "not UTF-8"),
                                          ("steps: " + "9" * 5000 + "\n", "c.yaml: invalid YAML (ValueError"),
                                          ("steps: " + "[" * 5000 + "\n", "c.yaml: invalid YAML (RecursionError"),
                                          ("lora:\n  rank: 4\n  alpha: 8\n  rank: 2\n",
                                           "c.yaml:4: invalid YAML (duplicate key 'rank')")])
def test_pretrain_bad_yaml_is_one_line(tmp_path, capsys, text, needle):
    cfg = write(tmp_path / "c.yaml", text)
    code, err = run_cli("launch/pretrain.py", ["--config", cfg, "--workdir", tmp_path / "r", *TINY], capsys)
    one_clear_error(code, err, needle)
    assert len(err.strip().splitlines()) == 1, err


def test_yaml_merge_keys_may_override_and_an_override_may_not_repeat_a_key(tmp_path):
    """Keys a ``<<`` merge brings in may be overridden (also inside a mapping that is itself merged elsewhere); a key
    written twice in one mapping, in a file or in a key=value override, is an error, not the last one kept."""
    from cancerllm_jax.config import load_yaml
    from cancerllm_jax.train.config import PretrainConfig, resolve

    cfg = write(tmp_path / "m.yaml", "defs:\n  small: &small\n    <<: {rank: 8, alpha: 16}\n    rank: 4\n"
                                     "lora:\n  <<: *small\n  alpha: 2\n")
    assert load_yaml(cfg)["lora"] == {"rank": 4, "alpha": 2}
    with pytest.raises(UserError, match=r"override 'lora=\{rank: 4, rank: 2\}': duplicate key 'rank'"):
        resolve(PretrainConfig, None, ["lora={rank: 4, rank: 2}"])


def test_numbers_read_as_written_and_text_fields_take_the_raw_text(tmp_path):
    """YAML 1.1 read ``seed=010`` as octal 8 and ``steps=1:30`` as base-60 90 (``--seed 010`` gives 10); a text field
    got YAML's reading of its value (``mesh=0x1`` became "1", and the error named '1'). The same numbers in a config
    file read the same."""
    from cancerllm_jax.config import load_yaml
    from cancerllm_jax.train.config import PretrainConfig, resolve

    cfg = resolve(PretrainConfig, None, ["seed=010", "steps=0100", "data.block_size=0_64", "batch_size=0x10",
                                         "optim.lr=1e-4", "mesh=0x1", "model=yes"])
    assert (cfg.seed, cfg.steps, cfg.data.block_size, cfg.batch_size, cfg.optim.lr) == (10, 100, 64, 16, 1e-4)
    assert (cfg.mesh, os.path.basename(cfg.model)) == ("0x1", "yes")  # a model path, recorded absolute
    with pytest.raises(UserError, match="steps: expected int, got '1:30'"):
        resolve(PretrainConfig, None, ["steps=1:30"])
    assert load_yaml(write(tmp_path / "n.yaml", "seed: 010\nsteps: -0100\nlr: 1:30.5\n")) == \
        {"seed": 10, "steps": -100, "lr": "1:30.5"}


def _fake_run(wd, rank=2):
    """A run folder with run.json and a (fake) finished checkpoint: enough for --resume's config check."""
    from cancerllm_jax.config import to_dict
    from cancerllm_jax.train import run_io
    from cancerllm_jax.train.config import PretrainConfig, resolve

    cfg = resolve(PretrainConfig, None, ["steps=2", "batch_size=2", "data.block_size=32", "synthetic_documents=20",
                                         f"lora.rank={rank}", "data.eval_fraction=0"])
    os.makedirs(os.path.join(wd, "checkpoints", "1", "state"))
    run_io.write_json_atomic(os.path.join(wd, run_io.RUN_FILE), {"format": run_io.FORMAT, "config": to_dict(cfg)})


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    wd = str(tmp_path / "run")
    _fake_run(wd, rank=2)
    before = sorted(os.listdir(wd))
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, "--resume", *tiny_less(["lora.rank=8"]), "lora.rank=8"],
                        capsys)
    one_clear_error(code, err, "--resume", "lora.rank", wd)
    assert sorted(os.listdir(wd)) == before


def test_resume_from_a_damaged_checkpoint_is_one_clear_error(tmp_path, capsys):
    wd = tmp_path / "run"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--save-every", "1"], capsys)
    assert code in (0, None), err
    tear_orbax_data(wd / "checkpoints")
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, "--resume", *TINY, "--save-every", "1"], capsys)
    one_clear_error(code, err, "checkpoints/2", "corrupt or unreadable checkpoint")


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    wd = str(tmp_path / "run")
    _fake_run(wd)
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY], capsys)
    one_clear_error(code, err, "--resume", wd)


def test_resume_from_a_corrupt_run_json(tmp_path, capsys):
    wd = tmp_path / "run"
    (wd / "checkpoints" / "1" / "state").mkdir(parents=True)
    write(wd / "run.json", '{"format": "cancerllm-jax/run-v1", "config": {')
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, "--resume", *TINY], capsys)
    one_clear_error(code, err, "run.json", "unreadable")


def test_disk_full_writing_the_run_leaves_no_run(tmp_path, capsys, monkeypatch):
    """ENOSPC when run.json is renamed into place: one clear line; the folder is not taken for a run."""
    from cancerllm_jax.train import run_io

    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(run_io.RUN_FILE):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    wd = tmp_path / "run"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY], capsys)
    one_clear_error(code, err, "disk full", "run.json")
    assert not run_io.is_run_dir(str(wd))
    no_temp_files(wd)


def test_log_examples_shows_the_first_example_and_its_scored_part(tmp_path, capsys, models):
    """With ``--log-examples`` the run prints its first example as the model reads it and the part the loss is taken
    on (the response + EOS for instruction tuning); without it, that text appears nowhere in the output."""
    train = write(tmp_path / "train.jsonl", '{"instruction": "Name the zebracarcinoma stage.", "response": '
                  '"stage quokka"}\n' * 2)
    argv = ["--model", models["tok"], "--data", train, "--mesh", "1x1", "--batch-size", "1", "--steps", "1",
            "data.max_seq_len=64", "lora.rank=2"]
    code, err = run_cli("launch/finetune.py", [*argv, "--workdir", tmp_path / "a", "--log-examples"], capsys)
    assert code in (0, None), err
    shown = err[err.index("--- input ---"):err.index("--- end ---")]
    assert "zebracarcinoma" in shown and "stage quokka" in shown
    assert shown.split("--- loss on ---")[1].strip() == "stage quokka", shown
    code, err = run_cli("launch/finetune.py", [*argv, "--workdir", tmp_path / "b"], capsys)
    assert code in (0, None) and "zebracarcinoma" not in err and "quokka" not in err, err


def test_log_examples_is_announced_at_start(tmp_path, capsys):
    """``--log-examples`` says so before anything else happens (here the bad mesh stops the run right after)."""
    code, err = run_cli("launch/pretrain.py", ["--log-examples", "--workdir", tmp_path / "r", *TINY,
                                               "--mesh", "10by1"], capsys)
    assert code == 2 and "--log-examples is ON" in err and "note text" in err
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--mesh", "10by1"], capsys)
    assert code == 2 and "--log-examples" not in err


# ------------------------------------------------------------------------------ launch/finetune.py

FINETUNE = {
    "no_response": ('{"instruction": "What is the diagnosis?", "context": "pt w/ nsclc"}\n',
                    ["no_response.jsonl:1", "'response'"]),
    "wrong_type": ('{"instruction": 7, "context": "", "response": "x"}\n', ["wrong_type.jsonl:1", "'instruction'"]),
    "malformed": ('{"instruction": "q", "response": "a"}\n{"instruction": "q", "response": \n',
                  ["malformed.jsonl:2"]),
    "empty": ("", ["empty.jsonl"]),
    "non_utf8": (b'{"instruction": "q", "response": "\xe9"}\n', ["non_utf8.jsonl:1", "UTF-8"]),
    "overlong_response": ('{"instruction": "Summarise.", "context": "", "response": "'
                          + "metastatic disease " * 400 + '"}\n', ["response", "max_seq_len"]),
    "cr_line_ends": ('{"instruction": "q", "response": "a"}\r{"instruction": "q", "response": "b"}\r',
                     ["cr_line_ends.jsonl:1", "lone CR", "LF"]),
}


@pytest.mark.parametrize("case", sorted(FINETUNE))
def test_finetune_bad_instruction_data(case, tmp_path, capsys, models):
    text, needles = FINETUNE[case]
    path = write(tmp_path / f"{case}.jsonl", text)
    wd = tmp_path / "run"
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", path, "--workdir", wd,
                                               "--mesh", "1x1", "--batch-size", "2", "--steps", "1",
                                               "data.max_seq_len=64", "lora.rank=2"], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(wd)


def test_finetune_refuses_its_training_file_as_held_out_data(tmp_path, capsys, models):
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4)
    os.symlink(train, tmp_path / "same.jsonl")
    wd = tmp_path / "run"
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", train, "--eval-data",
                                               tmp_path / "same.jsonl", "--workdir", wd, "--mesh", "1x1",
                                               "--dry-run", "data.max_seq_len=64", "lora.rank=2"], capsys)
    one_clear_error(code, err, "--eval-data", "same.jsonl", "is the --data file")
    nothing_left(wd)


def test_eval_data_is_read_with_the_synthetic_training_data(tmp_path, capsys, models):
    """--eval-data without --data: the held-out file is read (its bad line is reported), not the synthetic split."""
    ev = write(tmp_path / "ev.jsonl", '{"instruction": "q", "response": "a"}\nNOT JSON\n')
    argv = ["--model", models["tok"], "--eval-data", ev, "--workdir", tmp_path / "run", "--mesh", "1x1",
            "--batch-size", "2", "--dry-run", "data.max_seq_len=512", "lora.rank=2", "synthetic_patients=10"]
    code, err = run_cli("launch/finetune.py", argv, capsys)
    one_clear_error(code, err, "ev.jsonl:2", "invalid JSON")
    code, err = run_cli("launch/finetune.py", argv + ["--skip-bad-lines"], capsys)
    assert code in (0, None), err
    assert f"eval examples from {ev}" in err and "eval data: 1 examples" in err and "1 lines skipped" in err, err


def test_repeated_training_examples_are_named_in_a_warning(tmp_path, caplog):
    from cancerllm_jax.data.instruct import read_instruct_jsonl

    lines = ['{"instruction": "q", "response": "a", "id": 1}', '{"instruction": "q", "response": "b"}',
             '{"instruction": "q", "response": "a", "id": 2}', '{"instruction": "q", "context": "", "response": "a"}']
    path = write(tmp_path / "t.jsonl", "\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        records, _ = read_instruct_jsonl(path, training=True)
    assert len(records) == 4  # kept: each is trained as often as it appears
    assert "t.jsonl: 2 line(s) repeat an earlier example word for word (first: line 3 repeats line 1)" in caplog.text


FINETUNE_ARGS = {
    "epochs_zero": (["--epochs", "0"], ["epochs", "positive"]),
    "epochs_negative": (["--epochs", "-2"], ["epochs", "positive"]),
    "lr_negative": (["optim.lr=-2e-4"], ["optim.lr", "positive"]),
    "lora_alpha_negative": (["lora.alpha=-1"], ["lora.alpha", "positive"]),
    "batch_size_negative": (["--batch-size", "-4"], ["batch_size", ">= 1"]),
    "epochs_nan": (["--epochs", "nan"], ["epochs", "positive"]),
    "epochs_inf": (["--epochs", "inf"], ["epochs", "positive"]),
    "steps_negative": (["--steps", "-5"], ["steps", ">= 0"]),
    "data_seed_negative": (["data.seed=-1"], ["data.seed", "2**32"]),  # --dry-run checks the data settings too
    # --steps won over --epochs without a word (pretrain.py refused the pair already)
    "steps_and_epochs_on_the_command_line": (["--steps", "2", "epochs=3"], ["steps (2)", "epochs (3)",
                                                                          "pass one of the two"]),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_ARGS))
def test_finetune_bad_arguments(case, tmp_path, capsys, models):
    extra, needles = FINETUNE_ARGS[case]
    wd = tmp_path / "run"
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--workdir", wd, "--mesh", "1x1",
                                               "--dry-run", "data.max_seq_len=64", "lora.rank=2", *extra], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(wd)


def test_finetune_says_a_task_given_with_data_picks_nothing(tmp_path, capsys, models):
    """``--task`` chooses the built-in synthetic data; beside ``--data`` it changed nothing, silently."""
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4)
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", train, "--task", "phenotype",
                                               "--workdir", tmp_path / "run", "--mesh", "1x1", "--batch-size", "2",
                                               "--dry-run", "data.max_seq_len=64", "lora.rank=2"], capsys)
    assert code == 0 and "note: task=phenotype picks built-in synthetic data only" in err, err


def test_finetune_epochs_too_many_steps(tmp_path, capsys, models):
    """--epochs 1e308 is finite, but its steps overflow: one line, not an OverflowError."""
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4)
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", train, "--workdir",
                                               tmp_path / "run", "--mesh", "1x1", "--batch-size", "2", "--dry-run",
                                               "--epochs", "1e308", "data.max_seq_len=64", "lora.rank=2"], capsys)
    one_clear_error(code, err, "epochs", "2**31 - 1")
    nothing_left(tmp_path / "run")


def test_finetune_counts_what_it_skips_of_the_eval_data(tmp_path, capsys, caplog, models):
    """Skipped lines and examples too long for data.max_seq_len are counted for the training and the eval data, and
    the first too-long ones are named by file and line (the training count was only in the JSON stats)."""
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4
                  + '{"instruction": "Summarise.", "response": "' + "metastatic disease " * 60 + '"}\n')
    ev = write(tmp_path / "ev.jsonl", '{"instruction": "q", "response": "a"}\n{broken\n'
               '{"instruction": "Summarise.", "response": "' + "metastatic disease " * 60 + '"}\n')
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", train, "--eval-data", ev,
                                               "--workdir", tmp_path / "run", "--mesh", "1x1", "--batch-size", "2",
                                               "--dry-run", "--skip-bad-lines", "data.max_seq_len=64",
                                               "lora.rank=2"], capsys)
    assert code in (0, None), err
    assert "eval data: 1 examples" in err and "1 too long skipped" in err and "1 lines skipped" in err, err
    assert "data: 4 rows" in err and "; 0 contexts truncated, 1 too long skipped, 0 lines skipped" in err, err
    assert "train.jsonl:5: the response alone is" in caplog.text + err


def test_resume_refuses_a_base_whose_weights_changed(tmp_path, capsys, models):
    """A run resumed on a base whose weights changed in place (same config, same path) is refused, as changed data
    is: the adapter would continue on another model. A copy of the same weights (new file dates) resumes."""
    from safetensors.numpy import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(models["tok"], base)
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4)
    wd = tmp_path / "run"
    argv = ["--model", base, "--data", train, "--workdir", wd, "--mesh", "1x1", "--batch-size", "2", "--steps", "2",
            "data.max_seq_len=64", "lora.rank=2"]
    code, err = run_cli("launch/finetune.py", argv + ["--save-every", "1"], capsys)
    assert code in (0, None), err
    shutil.rmtree(wd / "checkpoints" / "2")  # as if killed before the last save
    moved = tmp_path / "moved"
    shutil.copytree(base, moved, copy_function=shutil.copyfile)  # same weights, new dates
    shutil.rmtree(base)
    moved.rename(base)
    code, err = run_cli("launch/finetune.py", argv + ["--resume"], capsys)
    assert code in (0, None) and "resumed from step 1" in err, err
    shutil.rmtree(wd / "checkpoints" / "2")
    (name,) = [n for n in os.listdir(base) if n.endswith(".safetensors")]
    tensors = load_file(base / name)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 3
    save_file(tensors, base / name, metadata={"format": "pt"})
    code, err = run_cli("launch/finetune.py", argv + ["--resume"], capsys)
    one_clear_error(code, err, "--resume", "other weights", "new --workdir")
    # loading or exporting the run is refused alike: its LoRA would be applied to another model
    with pytest.raises(UserError, match=r"run: its base model .*base .* has other weights than the run trained on"):
        cj.load(wd)
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", wd, tmp_path / "hf", "--merge-lora"], capsys)
    one_clear_error(code, err, "other weights", "put the original weights back")
    assert not (tmp_path / "hf").exists()


def test_a_mistral_folder_without_tokenizer_says_which_one_it_uses(tmp_path, models, caplog):
    """A 32,000-token Mistral folder without a tokenizer file gets the shipped Mistral v1 tokenizer, with a warning
    naming it (it was silent); a folder with its own tokenizer gets no such warning."""
    import logging

    bare = tmp_path / "bare"
    shutil.copytree(models["tok"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with caplog.at_level(logging.WARNING):
        assert cj.load(bare).tokenizer.vocab_size == 32000
    assert "no tokenizer file beside the weights" in caplog.text and "Mistral-7B v0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cj.load(models["tok"])
    assert "no tokenizer file" not in caplog.text


def test_finetune_reads_the_base_weights_once(tmp_path, capsys, models, monkeypatch):
    """The launcher needs the base's tokenizer before the Trainer exists; the weights it read then are the ones
    trained on (not read a second time: minutes and a second copy in host memory for a 7B base)."""
    import cancerllm_jax.api as api

    read, calls = api.read_weights, []
    monkeypatch.setattr(api, "read_weights", lambda *a, **k: calls.append(a) or read(*a, **k))
    train = write(tmp_path / "train.jsonl", '{"instruction": "q", "response": "a"}\n' * 4)
    code, err = run_cli("launch/finetune.py", ["--model", models["tok"], "--data", train, "--workdir",
                                               tmp_path / "run", "--mesh", "1x1", "--batch-size", "2", "--steps", "1",
                                               "data.max_seq_len=64", "lora.rank=2"], capsys)
    assert code in (0, None), err
    assert len(calls) == 1, calls


def test_finetune_data_paths_are_taken_literally(tmp_path, capsys):
    """--data / --eval-data became YAML overrides: a path with ` #` was cut at the comment (another file, or "no
    such file"), one with `: ` became a mapping. They are read as written."""
    row = '{"instruction": "q", "context": "c", "response": "a"}\n'
    train, held = write(tmp_path / "diag #1.jsonl", row * 3), write(tmp_path / "a: b😀.jsonl", row * 2)
    write(tmp_path / "diag", "not the file\n")  # where the cut path pointed
    code, err = run_cli("launch/finetune.py", ["--data", train, "--eval-data", held, "--workdir", tmp_path / "r",
                                               "--mesh", "1x1", "--batch-size", "1", "--dry-run"], capsys)
    assert code in (0, None), err
    assert "data: 3 rows" in err and "eval data: 2 examples" in err, err
    from cancerllm_jax.config import literal_override

    # a path YAML reads unchanged is passed as it is: reproduce.py's recorded stage commands stay the same
    assert literal_override("model", "/data/models/smollm2") == "model=/data/models/smollm2"
    assert literal_override("data.sources", ["/a #1", "b😀"]) == 'data.sources=["/a #1", "b😀"]'


def test_finetune_dry_run_counts_the_data_with_the_model_tokenizer(tmp_path, capsys, models):
    """--dry-run reads the data with the model folder's own tokenizer, as the run does (it fell back to Mistral
    v1's: other row, truncation and step counts, and a pass where the run fails)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models as tk_models, pre_tokenizers

    folder = tmp_path / "chars"
    shutil.copytree(models["small"], folder)
    vocab = {"</s>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz #:.,\n")}}
    tk = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="#"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(folder)
    context = "long context text " * 20
    train = write(tmp_path / "train.jsonl", f'{{"instruction": "q", "context": "{context}", "response": "a"}}\n' * 3)
    lines = {}
    for mode in ("--dry-run", "--steps"):
        argv = ["--model", folder, "--data", train, "--workdir", tmp_path / mode.strip("-"), "--mesh", "1x1",
                "--batch-size", "1", "data.max_seq_len=320", "lora.rank=2", mode] + (["1"] if mode == "--steps" else [])
        code, err = run_cli("launch/finetune.py", argv, capsys)
        assert code in (0, None), err
        lines[mode] = next(line for line in err.splitlines() if line.startswith("data: "))
    assert "3 contexts truncated" in lines["--steps"], lines
    same = [(line.split(", ")[:2], line.split("; ")[1]) for line in lines.values()]  # rows, steps/epoch, counts
    assert same[0] == same[1], lines


# ------------------------------------------------------------------------------ launch/generate.py

def _gen(models, tmp_path, capsys, lines, model="tok", extra=()):
    inp = write(tmp_path / "in.jsonl", lines) if lines is not None else str(tmp_path / "missing.jsonl")
    out = tmp_path / "pred.jsonl"
    code, err = run_cli("launch/generate.py", ["--model", models.get(model, model), "--input", inp, "--out", out,
                                               "--max-new-tokens", "2", *extra], capsys)
    return code, err, out


GENERATE = {
    "no_prompt_field": ('{"question": "x"}\n', "tok", ["in.jsonl:1", "'prompt' or an 'instruction'"]),
    "wrong_type": ('{"prompt": 3}\n', "tok", ["in.jsonl:1", "'prompt'"]),
    "non_utf8": (b'{"prompt": "\xff"}\n', "tok", ["in.jsonl:1", "UTF-8"]),
    "empty": ("", "tok", ["in.jsonl", "no records"]),
    "missing_input": (None, "tok", ["missing.jsonl", "no such file"]),
    "missing_model": ('{"prompt": "x"}\n', "/nonexistent/model", ["/nonexistent/model", "not found"]),
    "missing_tokenizer": ('{"prompt": "x"}\n', "small", ["no tokenizer"]),
    "null_prompt": ('{"prompt": null}\n', "tok", ["in.jsonl:1", "'prompt' or an 'instruction'"]),
    "duplicate_id": ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n', "tok",
                     ["in.jsonl:3", "duplicate id 'a' (first on line 1)"]),
    "same_id_as_int_and_str": ('{"id": 7, "prompt": "x"}\n{"id": "7", "prompt": "y"}\n', "tok",
                               ["in.jsonl:2", "duplicate id '7'"]),
    "id_as_another_lines_name": ('{"id": "line2", "prompt": "x"}\n{"prompt": "y"}\n', "tok",
                                 ["in.jsonl:2", "duplicate id 'line2'", "this line has no id"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate_bad_inputs(case, tmp_path, capsys, models):
    lines, model, needles = GENERATE[case]
    code, err, out = _gen(models, tmp_path, capsys, lines, model)
    one_clear_error(code, err, *needles)
    nothing_left(out)


GENERATE_FLAGS = {
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "batch_size_negative": (["--batch-size", "-3"], ["--batch-size", "at least 1"]),
    "max_new_tokens_zero": (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    "max_prompt_tokens_zero": (["--max-prompt-tokens", "0"], ["--max-prompt-tokens", "at least 1"]),
    "top_k_negative": (["--top-k", "-1"], ["--top-k", ">= 0"]),
    "temperature_negative": (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
    "temperature_nan": (["--temperature", "nan"], ["--temperature", ">= 0"]),
    "temperature_inf": (["--temperature", "inf"], ["--temperature", "a finite number >= 0"]),
    "top_p_zero": (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    "top_p_above_one": (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    "empty_stop": (["--stop", ""], ["--stop", "empty"]),
    "max_new_tokens_past_memory": (["--max-new-tokens", "2000000000"], ["max_new_tokens=2000000000", "GiB"]),
    "max_new_tokens_past_int32": (["--max-new-tokens", str(2**31)], ["max_new_tokens=2147483648", "2**31"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE_FLAGS))
def test_generate_bad_decoding_flags(case, tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr("cancerllm_jax.decode.device_memory_bytes", lambda lm: 2**34)  # 16 GiB, whatever the host
    extra, needles = GENERATE_FLAGS[case]
    code, err, out = _gen(models, tmp_path, capsys, '{"prompt": "pt w/ nsclc"}\n', extra=extra)
    one_clear_error(code, err, *needles)
    nothing_left(out)


def test_generate_samples_of_a_line_do_not_depend_on_other_lines(tmp_path, capsys, models):
    """--seed gives each input line its own stream (from the seed and its line number): a line skipped as bad above
    it, or another batch size, leaves its sample as it was."""
    good = '{"prompt": "pt w/ nsclc"}\n{"prompt": "er+ pr- her2-"}\n'
    runs = []
    for first, extra in (('{"prompt": "ecog 1"}\n', ["--batch-size", "3"]), ('{"prompt": 3}\n', ["--skip-bad-lines"])):
        (tmp_path / "pred.jsonl").unlink(missing_ok=True)
        code, err, out = _gen(models, tmp_path, capsys, first + good, extra=["--temperature", "1.0", "--seed", "7",
                                                                             "--max-new-tokens", "6", *extra])
        assert code in (0, None), err
        runs.append([json.loads(x)["prediction"] for x in out.read_text().splitlines()][-2:])
    assert runs[0] == runs[1]
    # lines with ids draw from their id (as evaluate.py run does): the same file in another order, the same samples
    rows = [json.dumps({"id": f"n{i}", "prompt": p}) + "\n" for i, p in enumerate(("pt w/ nsclc", "ecog 1", "er+"))]
    by_id = []
    for lines in (rows, rows[::-1]):
        (tmp_path / "pred.jsonl").unlink(missing_ok=True)
        code, err, out = _gen(models, tmp_path, capsys, "".join(lines),
                              extra=["--temperature", "1.0", "--seed", "7", "--max-new-tokens", "6"])
        assert code in (0, None), err
        by_id.append({r["id"]: r["prediction"] for r in map(json.loads, out.read_text().splitlines())})
    assert by_id[0] == by_id[1] and len(set(by_id[0].values())) > 1, by_id


def test_generate_top_k_above_the_vocabulary_is_fine(tmp_path, capsys, models):
    """--top-k larger than the vocabulary keeps every token (as top_k=0 does) rather than failing."""
    code, err, out = _gen(models, tmp_path, capsys, '{"prompt": "pt w/ nsclc"}\n',
                          extra=["--top-k", "100000", "--temperature", "0.7"])
    assert code in (0, None), err
    assert len(open(out, encoding="utf-8").read().splitlines()) == 1


def test_generate_bad_records_name_their_line_or_are_skipped(tmp_path, capsys, models):
    """A record without a prompt field and an instruction too long for --max-prompt-tokens: each an error naming
    its line, both counted and skipped with --skip-bad-lines."""
    long = json.dumps({"instruction": "word " * 300})
    code, err, out = _gen(models, tmp_path, capsys, f'{long}\n', extra=["--max-prompt-tokens", "64"])
    one_clear_error(code, err, "in.jsonl:1", "--max-prompt-tokens")
    nothing_left(out)
    lines = '{"prompt": "pt w/ nsclc"}\n{"question": "x"}\n' + long + "\n"
    code, err, out = _gen(models, tmp_path, capsys, lines, extra=["--max-prompt-tokens", "64"])
    one_clear_error(code, err, "in.jsonl:2", "'prompt' or an 'instruction'")
    code, err, out = _gen(models, tmp_path, capsys, lines, extra=["--max-prompt-tokens", "64", "--skip-bad-lines"])
    assert code in (0, None), err
    assert "2 bad lines skipped" in err and len(open(out, encoding="utf-8").read().splitlines()) == 1


def test_generate_refuses_to_overwrite(tmp_path, capsys, models):
    write(tmp_path / "pred.jsonl", "keep me\n")
    code, err, out = _gen(models, tmp_path, capsys, '{"prompt": "x"}\n')
    one_clear_error(code, err, "pred.jsonl", "--overwrite")
    assert open(out).read() == "keep me\n"


def test_generate_disk_full_leaves_no_partial_predictions(tmp_path, capsys, models, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, err, out = _gen(models, tmp_path, capsys, '{"prompt": "pt w/ nsclc"}\n')
    one_clear_error(code, err, "disk full")
    nothing_left(out)
    no_temp_files(tmp_path)


def test_generate_refuses_an_unwritable_out_folder_before_loading_the_model(tmp_path, capsys, models, monkeypatch):
    """--out in a folder that cannot be written is refused before the model is read (it failed after decoding
    every prompt, losing all of it)."""
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    loads = []
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(cj, "load", lambda *a, **k: loads.append(a))
    code, err, out = _gen(models, tmp_path, capsys, '{"prompt": "pt w/ nsclc"}\n')
    one_clear_error(code, err, "--out", "permission denied")
    assert not loads and not os.path.exists(out)


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Make launch/generate.py stop (as Ctrl-C does) once ``batches`` batches are saved to its partial file."""
    cls = _module("launch/generate.py")._Partial
    append, seen = cls.append, []

    def append_then_stop(self, rows):
        append(self, rows)
        seen.append(len(rows))
        if len(seen) == batches:
            raise KeyboardInterrupt

    monkeypatch.setattr(cls, "append", append_then_stop)


RESUME_LINES = "".join(json.dumps({"id": f"n{i}", "prompt": "pt w/ nsclc " + "stage iv " * i,
                                   "response": f"gold {i}"}) + "\n" for i in range(5))


def test_generate_interrupted_resumes_where_it_stopped(tmp_path, capsys, models, monkeypatch):
    """An interrupted generate.py keeps the batches it finished (hidden beside --out, which does not appear); the
    same command again decodes only the rest, and the output equals an uninterrupted run's, byte for byte; its
    summary counts the raw prompts cut over every line, as the uninterrupted run's does."""
    import re

    extra = ["--batch-size", "2", "--max-new-tokens", "4", "--max-prompt-tokens", "12"]
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    assert code in (0, None), err
    want, cut = out.read_bytes(), re.search(r"(\d+) raw prompts cut", err).group(1)
    assert int(cut) >= 2, err
    out.unlink()
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    assert code == 130 and not out.exists()
    assert len((tmp_path / ".pred.jsonl.partial.jsonl").read_text().splitlines()) == 4
    with open(tmp_path / ".pred.jsonl.partial.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "n0", "prompt_ha')  # a row cut by a kill mid-write: dropped and made again
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    assert code in (0, None), err
    assert "resuming: 4 of 5" in err and "(4 from the interrupted run)" in err
    assert f"{cut} raw prompts cut" in err, err
    assert out.read_bytes() == want
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "pred.jsonl"]  # nothing hidden left


@pytest.mark.parametrize("change", ["flags", "input"])
def test_generate_refuses_to_resume_with_other_settings_or_input(change, tmp_path, capsys, models, monkeypatch):
    """What an interrupted run left is never mixed with predictions made otherwise: other decoding flags or an
    edited input are refused, naming what changed; --overwrite discards it and starts over."""
    extra = ["--batch-size", "2"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    assert code == 130
    lines, again = RESUME_LINES, extra + ["--max-new-tokens", "3"] * (change == "flags")
    if change == "input":
        lines = RESUME_LINES.replace("gold 4", "gold four")
    code, err, out = _gen(models, tmp_path, capsys, lines, extra=again)
    one_clear_error(code, err, ".pred.jsonl.partial.jsonl", "other input, model or settings",
                    "max_new_tokens 2 (now 3)" if change == "flags" else "input_sha256", "--overwrite")
    assert not out.exists()
    code, err, out = _gen(models, tmp_path, capsys, lines, extra=again + ["--overwrite"])
    assert code in (0, None), err
    assert "resuming" not in err and len(out.read_text().splitlines()) == 5


def test_generate_overwrite_discards_rows_edited_by_hand(tmp_path, capsys, models, monkeypatch):
    """Same settings, but a row that is no prompt of the input (edited by hand): refused, and --overwrite, which
    the refusal names, starts over (it named --overwrite, which then refused the same way)."""
    extra = ["--batch-size", "2"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    rows = tmp_path / ".pred.jsonl.partial.jsonl"
    rows.write_text(rows.read_text().replace('"id": "n4"', '"id": "n9"'))
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    one_clear_error(code, err, "id 'n9' is not a prompt", "--overwrite")
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra + ["--overwrite"])
    assert code in (0, None), err
    assert "rows are discarded" in err and "resuming" not in err and len(out.read_text().splitlines()) == 5


def test_generate_resumes_with_overwrite_and_leaves_nothing_hidden(tmp_path, capsys, models, monkeypatch):
    """Regenerating over an existing --out needs --overwrite: an interrupted such run resumes too (--overwrite
    discarded its rows even when the settings were the same); the same dtype spelt fp32 is the same setting; a
    killed command's temp files are removed by the next; a finished --out never sits beside its partial rows."""
    extra = ["--batch-size", "2", "--overwrite"]
    write(tmp_path / "pred.jsonl", "an earlier output\n")
    for name in (".pred.jsonl.tmp-99999", "..pred.jsonl.partial.json.tmp-99999"):
        write(tmp_path / name, "left by a kill")
    other = ".pred.jsonl.tmp-b.jsonl.partial.jsonl"  # --out pred.jsonl.tmp-b.jsonl's rows: not this one's
    write(tmp_path / other, "")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra)
    assert code == 130 and out.read_text() == "an earlier output\n"
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES, extra=extra + ["--dtype", "fp32"])
    assert code in (0, None), err
    assert "resuming: 2 of 5" in err and len(out.read_text().splitlines()) == 5
    assert sorted(os.listdir(tmp_path)) == [other, "in.jsonl", "pred.jsonl"]


def test_generate_rechecks_out_once_it_holds_the_lock(tmp_path, capsys, models, monkeypatch):
    """--out was checked before the lock was taken: a command that finished the same --out meanwhile had its
    output replaced without --overwrite."""
    mod = _module("launch/generate.py")
    lock = mod.__dict__.get("FolderLock")
    from cancerllm_jax.train import run_io

    real = run_io.FolderLock

    class FinishedMeanwhile(real):
        def __enter__(self):
            write(tmp_path / "pred.jsonl", "another command's output\n")
            return super().__enter__()

    monkeypatch.setattr(run_io, "FolderLock", FinishedMeanwhile)
    assert lock is None  # imported at call time, from run_io
    code, err, out = _gen(models, tmp_path, capsys, RESUME_LINES)
    one_clear_error(code, err, "pred.jsonl exists", "--overwrite")
    assert out.read_text() == "another command's output\n"


# ------------------------------------------------------------------------------ tools/convert_checkpoint.py

def _bad_model(tmp_path, models, what) -> str:
    folder = tmp_path / what
    shutil.copytree(models["small"], folder)
    if what == "corrupt_safetensors":
        write(folder / "model.safetensors", b"\x00\x01 this is not a safetensors file" * 10)
    elif what == "truncated_safetensors":
        data = open(folder / "model.safetensors", "rb").read()
        write(folder / "model.safetensors", data[: len(data) // 2])
    elif what == "wrong_safetensors":  # the weights of another model: shapes differ from config.json
        shutil.copy(os.path.join(models["tok"], "model.safetensors"), folder / "model.safetensors")
    elif what == "unsupported_architecture":
        cfg = json.load(open(folder / "config.json"))
        cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
        write(folder / "config.json", json.dumps(cfg))
    elif what == "config_not_json":
        write(folder / "config.json", "{not json")
    elif what in ("rope_scaling_string", "model_type_list"):
        cfg = json.load(open(folder / "config.json"))
        if what == "rope_scaling_string":
            cfg["rope_scaling"] = "linear"
        else:
            cfg["model_type"] = ["mistral"]
        write(folder / "config.json", json.dumps(cfg))
    elif what == "int_weights":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k: v.astype("int32") for k, v in tensors.items()}, str(folder / "model.safetensors"))
    elif what == "index_weight_map_list":  # the index alone (beside model.safetensors it is ignored, as transformers)
        os.remove(folder / "model.safetensors")
        write(folder / "model.safetensors.index.json", json.dumps({"weight_map": ["model.safetensors"]}))
    elif what == "pickle_only":
        os.remove(folder / "model.safetensors")
        write(folder / "pytorch_model.bin", b"PK\x03\x04 pretend pickle")
    return str(folder)


CONVERT = {
    "corrupt_safetensors": ["model.safetensors", "corrupt or not a safetensors file"],
    "truncated_safetensors": ["model.safetensors"],
    "wrong_safetensors": ["shape", "config.json"],
    "unsupported_architecture": ["model_type 'gpt2' is not supported"],
    "config_not_json": ["config.json", "not valid JSON"],
    "rope_scaling_string": ["config.json", "rope_scaling"],
    "model_type_list": ["config.json", "model_type"],
    "index_weight_map_list": ["model.safetensors.index.json", "weight_map"],
    "int_weights": ["dtype int32", "floating-point"],
    "pickle_only": ["pickle", "safetensors"],
}


@pytest.mark.parametrize("case", sorted(CONVERT))
def test_convert_bad_weights(case, tmp_path, capsys, models):
    src = _bad_model(tmp_path, models, case)
    out = tmp_path / "out"
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", src, out], capsys)
    one_clear_error(code, err, *CONVERT[case])
    nothing_left(out)
    no_temp_files(tmp_path)


def test_a_damaged_converted_checkpoint_is_one_clear_error(tmp_path, capsys, models):
    out = tmp_path / "ckpt"
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", models["tok"], out], capsys)
    assert code in (0, None), err
    tear_orbax_data(out / "params")
    code, err, _ = _gen({"ck": str(out)}, tmp_path, capsys, '{"prompt": "pt w/ nsclc"}\n', model="ck")
    one_clear_error(code, err, "params", "corrupt or unreadable checkpoint")


def _edit_json(path, edit) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    edit(data)
    write(path, json.dumps(data))


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m["model"].update(num_layers=2), ["cancerllm.json:model", "layers/", "shape (1,"]),
    (lambda m: m["model"].update(tie_embeddings=True), ["cancerllm.json:model", "lm_head is not in the model"]),
    (lambda m: m["model"].update(hidden_size=32), ["cancerllm.json:model", "embed has shape (96, 16)"]),
    (lambda m: m.pop("model"), ["cancerllm.json", "no 'model' field"]),
])
def test_a_converted_checkpoint_whose_config_was_edited_is_refused(edit, needles, tmp_path, capsys, models):
    """The weights are checked against cancerllm.json's model before use: an edited config must not export or load
    the wrong layers (or drop lm_head) with exit 0."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", models["small"], ckpt], capsys)
    assert code in (0, None), err
    _edit_json(ckpt / "cancerllm.json", edit)
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", ckpt, out], capsys)
    one_clear_error(code, err, str(ckpt), *needles)
    nothing_left(out)
    with pytest.raises(UserError, match="cancerllm.json"):
        cj.load(str(ckpt))


def test_a_run_whose_run_json_was_edited_is_refused(tmp_path, capsys):
    """A run's trained weights (and its saved random base) are checked against run.json's model and LoRA config."""
    wd = tmp_path / "run"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY], capsys)
    assert code in (0, None), err
    for name, edit, needles in (
            ("layers", lambda m: m["model"].update(num_layers=m["model"]["num_layers"] + 1),
             ["run.json:", "shape ("]),
            ("rank", lambda m: m["config"]["lora"].update(rank=4), ["run.json:config.lora", "lora_a has shape"])):
        copy = tmp_path / name
        shutil.copytree(wd, copy)
        _edit_json(copy / "run.json", edit)
        code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", copy, tmp_path / f"{name}-hf"], capsys)
        one_clear_error(code, err, str(copy), *needles)
        nothing_left(tmp_path / f"{name}-hf")


def test_export_onto_a_non_empty_folder_needs_overwrite(tmp_path, capsys, models):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "mine")
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", models["small"], out], capsys)
    one_clear_error(code, err, "not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", models["small"], out, "--overwrite"], capsys)
    assert code in (0, None), err
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_float16_that_would_overflow_is_refused(tmp_path, capsys):
    """Weights past float16's range would become inf (and every logit NaN): --dtype float16 and
    cj.load(dtype="float16") refuse them, naming the tensor; bfloat16 takes them."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = 1e5
    folder, ckpt = str(tmp_path / "hf"), tmp_path / "ckpt"
    model.save_pretrained(folder, safe_serialization=True)
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", folder, tmp_path / "fp16", "--dtype", "float16"],
                        capsys)
    one_clear_error(code, err, "model.layers.1.mlp.up_proj.weight", "do not fit float16", "bfloat16")
    nothing_left(tmp_path / "fp16")
    code, err = run_cli("tools/convert_checkpoint.py", ["from-hf", folder, ckpt], capsys)
    assert code in (0, None), err
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", ckpt, tmp_path / "out", "--dtype", "float16"], capsys)
    one_clear_error(code, err, "--dtype float16", "layers.up.kernel", "do not fit float16")
    nothing_left(tmp_path / "out")
    with pytest.raises(UserError, match="layers.up.kernel: values up to 1e.05 do not fit float16"):
        cj.load(str(ckpt), dtype="float16")
    assert np.isfinite(cj.load(str(ckpt), dtype="bfloat16").logits([[1, 2, 3]])).all()


@pytest.mark.parametrize("command", ["to-hf", "from-hf"])
def test_an_output_folder_under_a_file_is_one_clear_error(command, tmp_path, capsys, models):
    write(tmp_path / "afile", "mine")
    code, err = run_cli("tools/convert_checkpoint.py", [command, models["small"], tmp_path / "afile" / "out"], capsys)
    one_clear_error(code, err, "afile/out", "is a file, not a folder")
    assert os.listdir(tmp_path) == ["afile"]


def test_export_disk_full_leaves_nothing(tmp_path, capsys, models, monkeypatch):
    from cancerllm_jax.checkpoint import hf

    def full(path, entries, metadata):  # a shard half written, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "_write_safetensors", full)
    out = tmp_path / "out"
    code, err = run_cli("tools/convert_checkpoint.py", ["to-hf", models["small"], out], capsys)
    one_clear_error(code, err, "disk full")
    nothing_left(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []


# ------------------------------------------------------------------------------ the other tools

def test_import_gguf_missing_and_corrupt(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli("tools/import_gguf.py", [tmp_path / "nope.gguf", "--out", out], capsys)
    one_clear_error(code, err, "nope.gguf", "not found")
    bad = write(tmp_path / "bad.gguf", b"GGUF" + b"\x00" * 64)
    code, err = run_cli("tools/import_gguf.py", [bad, "--out", out], capsys)
    one_clear_error(code, err, "bad.gguf")
    nothing_left(out)


@pytest.mark.parametrize("package", ["torch", "gguf"])
def test_tools_without_the_reference_extra_say_what_to_install(package, tmp_path, capsys, monkeypatch):
    """`pip install -e .` has no torch or gguf: the quickstart's import_gguf.py failed with "unexpected
    ModuleNotFoundError ... this is a bug"; it names the extra to install."""
    bad = write(tmp_path / "m.gguf", b"GGUF" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ImportError
    code, err = run_cli("tools/import_gguf.py", [bad, "--out", tmp_path / "out"], capsys)
    one_clear_error(code, err, f"needs the Python package '{package}'", "pip install -e '.[reference]'")


def test_check_parity_unsupported_architecture(tmp_path, capsys, models):
    src = _bad_model(tmp_path, models, "unsupported_architecture")
    code, err = run_cli("tools/check_parity.py", ["--hf-dir", src, "--json", tmp_path / "p.json"], capsys)
    one_clear_error(code, err, "gpt2")
    nothing_left(tmp_path / "p.json")


def test_check_parity_refuses_a_run_or_converted_checkpoint_before_loading(tmp_path, capsys):
    """transformers reads HF folders only: a run or a converted checkpoint is told to export first (it was loaded
    whole, then failed in transformers with a bare "could not load")."""
    from cancerllm_jax.checkpoint.orbax_io import META_FILE
    from cancerllm_jax.train.run_io import RUN_FILE

    for name, marker, kind in (("run", RUN_FILE, "training run"), ("ckpt", META_FILE, "converted checkpoint")):
        folder = tmp_path / name
        folder.mkdir()
        write(folder / marker, "{}")
        code, err = run_cli("tools/check_parity.py", ["--hf-dir", folder, "--json", tmp_path / "p.json"], capsys)
        one_clear_error(code, err, kind, "convert_checkpoint.py to-hf")
        nothing_left(tmp_path / "p.json")


def test_make_synthetic_data_bad_size_and_non_empty_out(tmp_path, capsys):
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", tmp_path / "d", "--size", "3"], capsys)
    one_clear_error(code, err, "--size")
    nothing_left(tmp_path / "d")
    (tmp_path / "full").mkdir()
    write(tmp_path / "full" / "x.txt", "mine")
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", tmp_path / "full", "--size", "10"], capsys)
    one_clear_error(code, err, "not empty", "overwrite")


def test_make_synthetic_data_disk_full(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "d"
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", out, "--size", "10"], capsys)
    one_clear_error(code, err, "disk full")
    # no data file, complete or partial: only the marker saying the folder is unfinished
    assert [p.name for p in out.rglob("*") if p.is_file()] == [".incomplete"]
    monkeypatch.undo()  # space freed: the same command completes the folder (it asked for --overwrite, which
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", out, "--size", "10"], capsys)  # replaces more)
    assert code in (0, None) and (out / "DATA.md").is_file() and not (out / ".incomplete").exists(), err
    (out / "DATA.md").unlink()  # a finished folder, or a user's own data in the same layout: still refused
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", out, "--size", "10"], capsys)
    one_clear_error(code, err, "not empty", "--overwrite")


def test_robustness_unknown_task(tmp_path, capsys, models):
    code, err = run_cli("launch/robustness.py", ["misspell", "--model", models["tok"], "--out", tmp_path / "o",
                                                 "--tasks", "diagnosiss"], capsys)
    one_clear_error(code, err, "--tasks", "diagnosiss")


@pytest.mark.parametrize("extra, needles", [(["--epochs", "inf"], ["epochs", "positive"]),
                                            (["lora.rnak=2"], ["rnak", "did you mean 'rank'"]),
                                            (["--model", "/nonexistent/base"], ["/nonexistent/base", "not found"]),
                                            (["--patients", "0"], ["--patients", "positive"])])
def test_robustness_counterfactual_checks_before_making_anything(extra, needles, tmp_path, capsys, models):
    """What every rate's fine-tuning would refuse is one line before OUT is made, not a failed first rate."""
    out = tmp_path / "o"
    code, err = run_cli("launch/robustness.py", ["counterfactual", "--model", models["tok"], "--out", out,
                                                 "--limit", "1", *extra], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(out)


@pytest.mark.parametrize("extra,needles", [(["--top-k", "-5"], ["--top-k", ">= 0"]),
                                           (["--top-p", "0"], ["--top-p", "(0, 1]"]),
                                           (["--temperature", "-1"], ["--temperature", ">= 0"]),
                                           (["--batch-size", "0"], ["--batch-size", "at least 1"]),
                                           (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"])])
def test_evaluate_run_and_robustness_bad_decoding_flags(extra, needles, tmp_path, capsys, models):
    code, err = run_cli("launch/evaluate.py", ["run", "--model", models["tok"], "--out", tmp_path / "o",
                                               "--limit", "1", *extra], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(tmp_path / "o")
    if extra[0] == "--max-new-tokens":
        code, err = run_cli("launch/robustness.py", ["misspell", "--model", models["tok"], "--out", tmp_path / "r",
                                                     *extra], capsys)
        one_clear_error(code, err, *needles)
        nothing_left(tmp_path / "r")


# ------------------------------------------------------------------------------ launch/evaluate.py score

EVALUATE = {
    "count_mismatch": ('{"response": "a"}\n{"response": "b"}\n', '{"prediction": "a"}\n', ["gold", "pred"]),
    "pred_not_json": ('{"response": "a"}\n', '{"prediction": \n', ["pred.jsonl:1"]),
    "pred_missing_field": ('{"response": "a"}\n', '{"text": "a"}\n', ["pred.jsonl:1", "'prediction'"]),
    "gold_empty": ("", '{"prediction": "a"}\n', ["gold.jsonl"]),
    "ids_do_not_match": ('{"id": "1", "response": "a"}\n', '{"id": "2", "prediction": "a"}\n', ["id"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_evaluate_prediction_file_does_not_match_gold(case, tmp_path, capsys):
    gold_text, pred_text, needles = EVALUATE[case]
    gold, pred = write(tmp_path / "gold.jsonl", gold_text), write(tmp_path / "pred.jsonl", pred_text)
    code, err = run_cli("launch/evaluate.py", ["score", "--gold", gold, "--pred", pred, "--json",
                                               tmp_path / "s.json"], capsys)
    one_clear_error(code, err, *needles)
    nothing_left(tmp_path / "s.json")


def test_evaluate_never_writes_over_its_inputs(tmp_path, capsys):
    """``score --json gold.jsonl`` once replaced the gold file with the summary: an output naming an input (or
    another output) is refused and every file is left as it was."""
    gold = write(tmp_path / "gold.jsonl", '{"response": "a"}\n')
    pred = write(tmp_path / "pred.jsonl", '{"prediction": "a"}\n')
    for extra, needles in ((["--json", gold], ["--json", "--gold"]), (["--per-instance", pred], ["--per-instance",
                                                                                                   "--pred"]),
                           (["--json", tmp_path / "s", "--per-instance", tmp_path / "s"], ["--per-instance", "--json",
                                                                                          "same file"])):
        code, err = run_cli("launch/evaluate.py", ["score", "--gold", gold, "--pred", pred, *extra], capsys)
        one_clear_error(code, err, *needles)
    assert open(gold).read() == '{"response": "a"}\n' and open(pred).read() == '{"prediction": "a"}\n'
    nothing_left(tmp_path / "s")


def test_evaluate_outputs_that_cannot_be_written_are_refused_before_scoring(tmp_path, capsys):
    """``--per-instance DIR`` scored, wrote --json, then failed naming a hidden temp file: the summary was left
    behind by a command that exited 2. Each output is checked first, and the error names its flag and path."""
    gold = write(tmp_path / "gold.jsonl", '{"id": 1, "response": "a"}\n')
    pred = write(tmp_path / "pred.jsonl", '{"id": 1, "prediction": "a"}\n')
    (tmp_path / "adir").mkdir()
    for extra, needles in ((["--json", tmp_path / "s.json", "--per-instance", tmp_path / "adir"],
                            ["--per-instance", "adir is a folder"]),
                           (["--json", tmp_path / "adir"], ["--json", "adir is a folder"]),
                           (["--json", tmp_path / "pred.jsonl" / "s.json"], ["--json", "pred.jsonl is a file"])):
        code, err = run_cli("launch/evaluate.py", ["score", "--gold", gold, "--pred", pred, *extra], capsys)
        one_clear_error(code, err, *needles)
        assert "tmp-" not in err and "EM" not in capsys.readouterr().out  # refused before it scored
        nothing_left(tmp_path / "s.json")
    code, err = run_cli("launch/evaluate.py", ["score", "--gold", gold, "--pred", pred, "--json",
                                               tmp_path / "new" / "deeper" / "s.json"], capsys)
    assert code in (0, None) and json.load(open(tmp_path / "new" / "deeper" / "s.json"))["n"] == 1, err


# ------------------------------------------------------------------------------ the front door

def test_front_door_load_errors(tmp_path, models):
    with pytest.raises(UserError, match="not found"):
        cj.load(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        cj.load(_bad_model(tmp_path, models, "unsupported_architecture"))
    with pytest.raises(UserError, match="corrupt or not a safetensors file"):
        cj.load(_bad_model(tmp_path, models, "corrupt_safetensors"))
    with pytest.raises(UserError, match="32000 tokens but the model's vocabulary is 96"):
        cj.load(models["small"], tokenizer="mistral-v1")  # mismatched vocabulary
    with pytest.raises(UserError, match="20x1"):
        cj.load(models["small"], mesh="20x1")
    with pytest.raises(UserError, match="dtype|float64"):
        cj.load(models["small"], dtype="float64")


def test_front_door_logits_and_generate_errors(models):
    lm = cj.load(models["small"])
    with pytest.raises(UserError, match=r"ids must be in \[0, 96\)"):
        lm.logits([[1, 2, 500]])
    with pytest.raises(UserError, match="integers"):
        lm.logits(np.zeros((1, 3), np.float32))
    with pytest.raises(UserError, match="non-empty"):
        lm.logits(np.zeros((1, 0), np.int32))
    with pytest.raises((UserError, ValueError, TypeError)) as e:
        lm.generate([[1, 2, 500]], max_new_tokens=2)  # id out of the vocabulary
    assert "prompt 0" in str(e.value) and "[0, 96)" in str(e.value)
    with pytest.raises((UserError, ValueError, TypeError)) as e:
        lm.generate(["a string prompt"], max_new_tokens=2)  # strings need a tokenizer; this model has none
    assert "tokenizer" in str(e.value)


def test_front_door_score_errors():
    from cancerllm_jax import eval as cj_eval

    with pytest.raises(ValueError, match="differ in length"):
        cj_eval.score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="lists of strings"):
        cj_eval.score("a", "a")
    with pytest.raises(TypeError, match="instance 0"):
        cj_eval.score([None], ["a"])
    with pytest.raises(UserError, match="unknown protocol"):
        cj_eval.score_file(None, os.devnull, protocol="strict")


# ------------------------------------------------------------------------------ real processes, --debug

def _subprocess(args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CANCERLLM_DEBUG")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_real_process_exit_code_and_debug_traceback(tmp_path):
    res = _subprocess(["tools/make_synthetic_data.py", "--out", str(tmp_path / "d"), "--size", "3"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: --size must be at least 10 (got 3)"]
    res = _subprocess(["tools/make_synthetic_data.py", "--out", str(tmp_path / "d"), "--size", "3", "--debug"])
    assert res.returncode != 0 and "Traceback" in res.stderr and "UserError" in res.stderr


def test_unexpected_exceptions_are_one_line_without_debug(capsys, monkeypatch):
    from cancerllm_jax.errors import cli_main

    @cli_main
    def boom(argv=None):
        raise KeyError("layers")

    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(SystemExit) as e:
        boom()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected KeyError") and "--debug" in err


@pytest.mark.parametrize("message", ["RESOURCE_EXHAUSTED: Out of memory allocating 480000034400000000 bytes.",
                                     "INTERNAL: Error dispatching computation: Out of memory allocating "
                                     "480000034400000000 bytes."])  # XLA:CPU, a 20k-token prefill
def test_out_of_device_memory_is_one_line_about_the_sizes(capsys, monkeypatch, message):
    """XLA's RESOURCE_EXHAUSTED (a batch, length or model too big for the devices) is the user's to fix: one line
    saying what to lower, exit 2, not a line calling it a bug."""
    from cancerllm_jax.errors import cli_main

    @cli_main
    def oom(argv=None):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(SystemExit) as e:
        oom()
    line = one_clear_error(e.value.code, capsys.readouterr().err, "out of memory", "480000034400000000 bytes",
                           "batch size")
    assert e.value.code == 2 and "bug" not in line


@pytest.mark.parametrize("message, needles", [
    ('RESOURCE_EXHAUSTED: Error writing local file "/runs/r/checkpoints/3.orbax-checkpoint-tmp/state/_sharding": '
     "Failed to write 4093 bytes to file 9: No space left on device [os_error_code='28']",
     ["disk full", "/runs/r/checkpoints/3.orbax-checkpoint-tmp/state/_sharding", "--resume"]),  # Orbax
    ("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" }) "
     "(os error 28)", ["disk full"]),  # safetensors
    ('PERMISSION_DENIED: Error opening "/ro/x": Read-only file system [os_error_code=\'30\']',
     ["permission denied", "/ro/x"])])
def test_a_full_disk_reported_as_text_is_one_line_and_library_tracebacks_are_cut(capsys, caplog, monkeypatch,
                                                                                 message, needles):
    """A full disk that a library reports in its text (Orbax's RESOURCE_EXHAUSTED with os_error_code 28,
    safetensors' "os error 28") is "disk full", not "out of memory" or a bug; the tracebacks Orbax's background
    threads log through absl are cut to their first line."""
    import logging

    from cancerllm_jax.errors import cli_main

    @cli_main
    def save(argv=None):
        try:
            raise ValueError(message)
        except ValueError:
            logging.getLogger("absl").exception("[thread=save_finalize] failed.\nmore")
        raise ValueError(message)

    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(SystemExit) as e:
        save()
    line = one_clear_error(e.value.code, capsys.readouterr().err, *needles)
    assert e.value.code == 2 and "bug" not in line and "out of memory" not in line
    logged = caplog.text
    assert "[thread=save_finalize] failed." in logged and "Traceback" not in logged and "more" not in logged


def test_a_librarys_error_records_are_notes_beside_the_one_error_line():
    """On a real full disk Orbax's save threads log two ERROR records through absl before the failure reaches the
    CLI: they printed as two more `error:` lines. They are `note: absl:` lines now; the CLI's line is the one error."""
    script = (
        "import errno, logging, sys\n"
        "from cancerllm_jax.errors import cli_main\n"
        "@cli_main\n"
        "def main(argv=None):\n"
        "    logging.getLogger('absl').error('[process=0] Failed to run 3 Handler Commit operations, directory: /w')\n"
        "    logging.getLogger('absl').warning('a library warning')\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints/1')\n"
        "main()\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_clear_error(p.returncode, p.stderr, "disk full")
    assert "note: absl: [process=0] Failed to run 3 Handler Commit operations" in p.stderr, p.stderr
    assert "warning: a library warning" in p.stderr, p.stderr


@pytest.mark.parametrize("message", ['could not parse "/data/notes/Permission denied letters.jsonl"',
                                     "tokenizer returned an error (os error 130)", 'KeyError: "model.layers.13"'])
def test_text_that_only_looks_like_an_os_error_stays_a_bug_report(capsys, monkeypatch, message):
    """Words inside a quoted path, or 'os error 130', are not a full disk or a refused write."""
    from cancerllm_jax.errors import cli_main, os_error_in_text

    assert os_error_in_text(ValueError(message)) is None

    @cli_main
    def boom(argv=None):
        raise ValueError(message)

    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(SystemExit) as e:
        boom()
    assert e.value.code == 1 and "unexpected ValueError" in capsys.readouterr().err


def test_the_log_filter_never_breaks_a_logging_call(capsys, caplog, monkeypatch):
    """An empty message with a traceback (``logging.exception("")``) is logged as the exception's first line; the
    filter raised IndexError into the caller."""
    import logging

    from cancerllm_jax.errors import cli_main

    @cli_main
    def main(argv=None):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("absl").exception("")
        return 0

    monkeypatch.setattr(sys, "argv", ["x"])
    assert main() == 0
    assert "ValueError: boom" in caplog.text and "Traceback" not in caplog.text


def test_a_commands_warnings_all_read_warning_colon():
    """Without a logging handler Python printed a warning's bare message until grain, on import, installed the
    default `WARNING:name:message` one: one command's warnings came out in both forms."""
    code = ("import logging, sys\nfrom cancerllm_jax.errors import cli_main\n@cli_main\ndef main():\n"
            "    logging.getLogger('cancerllm_jax.a').warning('before')\n    import grain  # noqa: F401\n"
            "    logging.getLogger('cancerllm_jax.b').warning('after')\n    return 0\nsys.exit(main())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stderr.splitlines() == ["warning: before", "warning: after"], out.stderr


def test_sigterm_before_the_first_step_exits_143_without_saving(tmp_path, capsys, monkeypatch):
    """SIGTERM while the step compiles (``describe``) stops the run at its first step, with one line and exit 143;
    raising from the signal handler in the middle of an XLA compile crashed the process (exit 139)."""
    import signal

    from cancerllm_jax.train.loop import Trainer

    describe = Trainer.describe

    def term_then_describe(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return describe(self, *a, **k)

    monkeypatch.setattr(Trainer, "describe", term_then_describe)
    previous = signal.getsignal(signal.SIGTERM)
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY], capsys)
    assert signal.getsignal(signal.SIGTERM) is previous  # the run's handler is removed again
    assert code == 143 and "Traceback" not in err and "terminated (SIGTERM): no step had run" in err, err
    assert not os.path.isdir(tmp_path / "r" / "checkpoints") or not os.listdir(tmp_path / "r" / "checkpoints")


def test_sigterm_during_the_final_evaluation_keeps_the_trained_steps(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM during the final evaluation (long on a big model) stops it at once with exit 143, the
    last step already saved; --resume evaluates that step and finishes (the signal used to wait for the whole
    evaluation, and the step was saved only after it: a kill after the grace period lost every step)."""
    import signal

    from cancerllm_jax.train.loop import Trainer

    evaluate = Trainer._evaluate

    def term_at_the_final_eval(self, batches, step, logger, mngr):
        if step == 2 and not self._sigterm.asked:
            assert os.listdir(tmp_path / "r" / "checkpoints") == ["2"]  # saved before the evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, batches, step, logger, mngr)

    args = ["--workdir", tmp_path / "r", *TINY[:-1], "data.eval_fraction=0.3"]
    monkeypatch.setattr(Trainer, "_evaluate", term_at_the_final_eval)
    code, err = run_cli("launch/pretrain.py", args, capsys)
    assert code == 143 and "Traceback" not in err and "terminated (SIGTERM)" in err, err
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows] == [1, 2] and not any("eval_loss" in r for r in rows)
    # tokens_per_s counts padding too; target_tokens_per_s only what the loss is taken on
    assert all(r["target_tokens_per_s"] == pytest.approx(r["target_tokens"] / r["step_s"]) for r in rows)
    assert " tok/s (" in err and " trained on)" in err
    from cancerllm_jax.train.loop import _rate

    assert (_rate(0.4), _rate(9.96), _rate(123.4)) == ("0.4", "10.0", "123")  # a slow step is not "0 trained on"
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    code, err = run_cli("launch/pretrain.py", [*args, "--resume"], capsys)
    assert code in (0, None), err
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]
    code, err = run_cli("launch/pretrain.py", [*args, "--resume"], capsys)  # finished and evaluated: nothing more
    assert code in (0, None), err
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]


def test_a_non_finite_final_evaluation_keeps_no_checkpoint_of_those_weights(tmp_path, capsys, monkeypatch):
    """The last step is saved before the final evaluation; when that evaluation's loss is NaN the step is not kept
    (as before the reorder), so the error's 'no checkpoint was saved' is true and a load cannot pick those weights."""
    from cancerllm_jax.train.loop import Trainer

    evaluate = Trainer._evaluate

    def nan_at_the_final_eval(self, batches, step, logger, mngr):
        if step == 2:
            self.eval_fn = lambda params, frozen, b: (float("nan"), 1.0)
        return evaluate(self, batches, step, logger, mngr)

    monkeypatch.setattr(Trainer, "_evaluate", nan_at_the_final_eval)
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY[:-1], "data.eval_fraction=0.3"],
                        capsys)
    one_clear_error(code, err, "eval loss is nan at step 2", "No checkpoint was saved")
    assert os.listdir(tmp_path / "r" / "checkpoints") == []


def test_resume_needs_the_run_folder(tmp_path, capsys, monkeypatch):
    """`--resume` without --workdir started a new run in a new runs/<kind>-<time> folder (the saved one never found,
    a scheduler's every retry another fresh run): it is refused before any data is read."""
    monkeypatch.chdir(tmp_path)
    for launcher in ("launch/pretrain.py", "launch/finetune.py"):
        code, err = run_cli(launcher, [*TINY[:2], "--resume"], capsys)
        one_clear_error(code, err, "--resume continues the run in --workdir: name its folder")
    assert not (tmp_path / "runs").exists()


def test_resume_keeps_the_dtype_auto_chose(tmp_path, capsys):
    """dtype auto is float32 on a CPU and bfloat16 on an accelerator: a run resumed on another kind of host changed
    precision without a word. It is refused unless the run's dtype is named, which is then the same setting."""
    import json as json_

    from cancerllm_jax.train.run_io import RUN_FILE

    wd = tmp_path / "r"
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--steps", "1"], capsys)
    assert code in (0, None), err
    meta = json_.loads((wd / RUN_FILE).read_text())
    assert (meta["config"]["dtype"], meta["dtype"]) == ("auto", "float32")
    (wd / RUN_FILE).write_text(json_.dumps({**meta, "dtype": "bfloat16"}))  # as if started on a GPU host
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--steps", "1", "--resume"], capsys)
    one_clear_error(code, err, "trained in bfloat16, but dtype auto is float32 on this host's cpu",
                    "resume with dtype=bfloat16")
    (wd / RUN_FILE).write_text(json_.dumps(meta))
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--steps", "1", "--resume", "dtype=float32"],
                        capsys)
    assert code in (0, None), err
    (wd / RUN_FILE).write_text(json_.dumps({**meta, "config": {**meta["config"], "dtype": "float32"}}))
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--steps", "1", "--resume"], capsys)
    assert code in (0, None), err  # started with dtype=float32, resumed with auto on a CPU: the same
    code, err = run_cli("launch/pretrain.py", ["--workdir", wd, *TINY, "--steps", "1", "--resume", "dtype=bfloat16"],
                        capsys)
    one_clear_error(code, err, "config differs", "dtype")


def test_ctrl_c_saves_the_step_it_is_on_and_a_second_stops_at_once(tmp_path, capsys, monkeypatch):
    """A first Ctrl-C (SIGINT) in a single-process run stops as SIGTERM does: the step it is on is saved, one line
    says so and how to go on, exit 130 (it printed "interrupted" and lost every step since the last checkpoint);
    a second Ctrl-C stops at once."""
    import signal

    from cancerllm_jax.train import loop
    from cancerllm_jax.train.run_io import latest_step

    write_row = loop._MetricsLog.write

    def interrupt_after_step_1(self, row):
        write_row(self, row)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop._MetricsLog, "write", interrupt_after_step_1)
    # Python's own handler, as in a terminal (a shell's background job starts with SIGINT ignored: no handler is set)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_runs(tmp_path, capsys, monkeypatch, write_row, loop, latest_step)
    finally:
        signal.signal(signal.SIGINT, outside)


def _ctrl_c_runs(tmp_path, capsys, monkeypatch, write_row, loop, latest_step):
    import signal

    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r", *TINY, "--steps", "3"], capsys)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is removed again
    assert code == 130 and "Traceback" not in err, err
    assert ("interrupted (Ctrl-C): the run saved step 1, the last it finished; run the same command with --resume "
            f"--workdir {tmp_path / 'r'} to continue") in err  # the folder named: a default one is new each start
    assert latest_step(str(tmp_path / "r" / "checkpoints")) == 1

    def interrupt_twice(self, row):
        write_row(self, row)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop._MetricsLog, "write", interrupt_twice)
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "r2", *TINY, "--steps", "3"], capsys)
    assert code == 130 and err.rstrip().endswith("interrupted"), err
    assert latest_step(str(tmp_path / "r2" / "checkpoints")) in (None, 0)


def test_ctrl_c_in_a_script_exits_130_without_interpreter_shutdown(tmp_path):
    """A Ctrl-C reaching a script's main (``python launch/...``) exits 130 at once: the interpreter's shutdown,
    which waits for other threads and died of SIGSEGV with an XLA compile running on its threads, is skipped (here a
    thread that would hold the exit for a minute); in-process (tests) it stays ``SystemExit(130)``."""
    import subprocess

    script = write(tmp_path / "script.py", "import threading, time\nfrom cancerllm_jax.errors import cli_main\n"
                   "@cli_main\ndef main():\n    threading.Thread(target=time.sleep, args=(60,)).start()\n"
                   "    raise KeyboardInterrupt\nmain()\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 130 and res.stderr.strip().endswith("interrupted"), res.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_a_command_waiting_for_its_training_child_stops_the_child_too(tmp_path, sig):
    """``reproduce.py`` and the counterfactual sweep run training as a child (``launch_common.run_child``): a SIGTERM
    or Ctrl-C to them is passed on as SIGTERM (the child saves and stops, as a training run does), they wait for it,
    then exit 143 / 130 with one line; the child was left training on its own, holding its run folder."""
    import signal

    child = write(tmp_path / "child.py", "import signal, sys, time\n"
                  "def stop(signum, frame):\n    open(sys.argv[1], 'w').write(signal.Signals(signum).name)\n"
                  "    sys.exit(143)\nsignal.signal(signal.SIGTERM, stop)\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n")
    parent = write(tmp_path / "parent.py", "import sys\nfrom cancerllm_jax.errors import cli_main\n"
                   "from cancerllm_jax.launch_common import run_child\n@cli_main\ndef main():\n"
                   "    with open(sys.argv[3], 'w') as log:\n"
                   "        return run_child([sys.executable, sys.argv[4], sys.argv[1], sys.argv[2]], log, 'stage x')\n"
                   "sys.exit(main())\n")
    got, started = tmp_path / "got", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, parent, got, started, tmp_path / "log", child], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=60)[1]
    assert got.read_text() == "SIGTERM"  # the child was asked to stop, and stopped before its parent exited
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), err
    assert f"{'terminated (SIGTERM)' if sig == 'SIGTERM' else 'interrupted (Ctrl-C)'}: stage x was stopped too" in err


def test_a_ctrl_c_while_the_child_starts_stops_the_child_too(tmp_path):
    """A Ctrl-C after the child had started but before ``run_child`` waited on it ended the command and left the
    child training on its own (the suite under load hit that window); the handlers are now set before the start."""
    child = write(tmp_path / "child.py", "import signal, sys, time\n"
                  "def stop(signum, frame):\n    open(sys.argv[1], 'w').write(signal.Signals(signum).name)\n"
                  "    sys.exit(143)\nsignal.signal(signal.SIGTERM, stop)\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)\nopen(sys.argv[2], 'w').close()\ntime.sleep(30)\n")
    parent = write(tmp_path / "parent.py", "import os, signal, subprocess, sys, time\n"
                   "from cancerllm_jax.errors import cli_main\nfrom cancerllm_jax.launch_common import run_child\n"
                   "real = subprocess.Popen\n"
                   "def popen(*a, **k):  # the child is up and ready; the Ctrl-C comes before the wait\n"
                   "    p = real(*a, **k)\n    while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
                   "    os.kill(os.getpid(), signal.SIGINT)\n    return p\n"
                   "subprocess.Popen = popen\n@cli_main\ndef main():\n"
                   "    with open(sys.argv[3], 'w') as log:\n"
                   "        return run_child([sys.executable, sys.argv[4], sys.argv[1], sys.argv[2]], log, 'stage x')\n"
                   "sys.exit(main())\n")
    got, started = tmp_path / "got", tmp_path / "started"
    res = subprocess.run([sys.executable, parent, got, started, tmp_path / "log", child], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 130 and "interrupted (Ctrl-C): stage x was stopped too" in res.stderr, res.stderr
    assert got.read_text() == "SIGTERM"  # passed on, and the child had ended before the command did


def test_a_second_sigterm_kills_a_child_that_does_not_stop(tmp_path):
    """A child that ignores SIGTERM (a scheduler sends only SIGTERM, twice): the second one kills it, and the
    command exits 143 at once instead of waiting for the child to end."""
    import signal

    child = write(tmp_path / "child.py", "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "open(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    parent = write(tmp_path / "parent.py", "import sys\nfrom cancerllm_jax.errors import cli_main\n"
                   "from cancerllm_jax.launch_common import run_child\n@cli_main\ndef main():\n"
                   "    with open(sys.argv[2], 'w') as log:\n"
                   "        return run_child([sys.executable, sys.argv[3], sys.argv[1]], log, 'stage x')\n"
                   "sys.exit(main())\n")
    started = tmp_path / "started"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, parent, started, tmp_path / "log", child], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    while not started.exists() and time.time() < t0 + 60:
        time.sleep(0.05)
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 143 and time.time() - t0 < 40, err


def test_pretrain_epochs_set_the_steps_as_hf_counts_them(tmp_path, capsys):
    """``--epochs E`` reads the corpus first and trains ceil(E x ceil(train blocks / batch)) steps (the paper's
    "1 epoch"); the run records both; a bad value is one clear error."""
    from cancerllm_jax.train.run_io import read_run_meta

    argv = ["--workdir", tmp_path / "r", "--mesh", "1x1", "--batch-size", "8", "data.block_size=32",
            "synthetic_documents=6", "lora.rank=2", "data.eval_fraction=0"]
    code, err = run_cli("launch/pretrain.py", [*argv, "--epochs", "1.5"], capsys)
    assert code in (0, None), err
    meta = read_run_meta(str(tmp_path / "r"))
    blocks = meta["data_counts"]["train_blocks"]
    assert meta["config"]["epochs"] == 1.5 and meta["config"]["steps"] == -(-3 * -(-blocks // 8) // 2), meta
    assert f"{meta['config']['steps']} steps" in err
    read, steps = meta["config"]["steps"] * 8, meta["config"]["steps"]  # whole batches: the overflow is named
    extra = read - round(1.5 * blocks)
    assert extra <= 0 or f"{steps} steps; {read} blocks read, {extra} past 1.5 epochs" in err, err
    for bad in ("0", "nan", "-1"):
        code, err = run_cli("launch/pretrain.py", [*argv, "--epochs", bad, "--dry-run"], capsys)
        one_clear_error(code, err, "epochs", "positive")


def test_dry_run_refuses_a_training_run_without_a_checkpoint(tmp_path, capsys):
    """--dry-run model=RUN refuses a run that has no finished checkpoint, as the run itself does."""
    from cancerllm_jax.train.run_io import RUN_FILE

    run = tmp_path / "run"
    run.mkdir()
    write(run / RUN_FILE, json.dumps({"format": 1, "model": {}, "config": {}}))
    code, err = run_cli("launch/pretrain.py", ["--workdir", tmp_path / "w", f"model={run}", "--dry-run"], capsys)
    one_clear_error(code, err, "no finished checkpoint")


# ------------------------------------------------------------------------------ launch/reproduce.py

@pytest.mark.parametrize("argv, needle", [(["--scale", "7b"], "needs --model"),
                                          (["--scale", "cpu-small", "--model", "no/such/model"], "not found")])
def test_reproduce_checks_its_model_before_making_anything(tmp_path, capsys, argv, needle):
    out = tmp_path / "rep"
    code, err = run_cli("launch/reproduce.py", [*argv, "--out", out], capsys)
    one_clear_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("tie_word_embeddings", "false"), ("hidden_size", 1.5),
                                          ("hidden_size", "64"), ("num_hidden_layers", True),
                                          ("rope_theta", float("nan")), ("rms_norm_eps", "1e-5"),
                                          ("sliding_window", 2.5), ("eos_token_id", "2"), ("head_dim", 5)])
def test_hf_config_values_of_the_wrong_type_are_refused(field, value):
    """bool("false") is True and int(1.5) is 1: a config.json value of the wrong type is one error naming it, never
    coerced into another model (transformers' strict configs refuse them too)."""
    from cancerllm_jax.config import from_hf_config

    hf = {"model_type": "mistral", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, field: value}
    with pytest.raises(UserError, match=f"c.json: (model config: )?{field}"):  # an odd head_dim: RoPE needs halves
        from_hf_config(hf, source="c.json")
    assert from_hf_config({**hf, field: {"tie_word_embeddings": True, "hidden_size": 64.0, "num_hidden_layers": 2,
                                         "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": 8,
                                         "eos_token_id": [2, 3], "head_dim": 16}[field]}, source="c.json")


def test_an_override_without_a_key_or_value_sign_is_one_clear_error():
    from cancerllm_jax.config import apply_overrides
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.train.config import PretrainConfig

    for item, needle in (("=5", "no key before '='"), ("steps", "expected key=value")):
        with pytest.raises(UserError, match=needle):
            apply_overrides({}, [item], PretrainConfig)


def test_a_llama_sliding_window_is_ignored_with_a_warning(caplog):
    """transformers' LlamaModel ignores a stray sliding_window (full attention) while its generate() builds a sliding
    cache; we follow the model, and say so (it was silent)."""
    from cancerllm_jax.config import from_hf_config

    hf = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert from_hf_config({**hf, "sliding_window": 4}, source="c.json").sliding_window is None
    assert "c.json: a llama config with sliding_window 4: ignored" in caplog.text
    caplog.clear()
    from_hf_config({**hf, "sliding_window": None}, source="c.json")
    assert "sliding_window" not in caplog.text
