"""Command-line bad input: a setting given twice, a broken --model for reproduce.py, a count of 0 for the synthetic
data tool, and held-out examples that are also training examples. Every case fails before any model is built."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import pytest

from cancerllm_jax.errors import UserError
from helpers import cli_module as _module, one_clear_error, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- a setting given twice

@pytest.mark.parametrize("script, argv, message", [
    ("pretrain", ["--steps", "1", "steps=2"], "steps is given twice (--steps 1 and steps=2); give it once"),
    ("pretrain", ["--mesh", "2x1", "mesh=1x1"], "mesh is given twice (--mesh 2x1 and mesh=1x1)"),
    ("pretrain", ["--batch-size", "4", "batch_size=2"], "batch_size is given twice (--batch-size 4 and batch_size=2)"),
    ("pretrain", ["--data", "a.jsonl", "data.sources=b.jsonl"],
     "data.sources is given twice (--data a.jsonl and data.sources=b.jsonl)"),
    ("pretrain", ["lora.rank=8", "lora.rank=9"], "lora.rank is given twice (lora.rank=8 and lora.rank=9)"),
    ("pretrain", ["lora.rank=8", "lora={rank: 9}"], "lora.rank is given twice (lora.rank=8 and lora={rank: 9})"),
    ("pretrain", ["--skip-bad-lines", "data.skip_bad_lines=false"], "data.skip_bad_lines is given twice"),
    ("pretrain", ["--full", "full=false"], "full is given twice (--full and full=false)"),
    ("finetune", ["--data", "a.jsonl", "data.path=b.jsonl"], "data.path is given twice (--data a.jsonl and "),
    ("finetune", ["--eval-data", "a.jsonl", "data.eval_path=b.jsonl"], "data.eval_path is given twice"),
    ("finetune", ["--model", "tiny", "model=other"], "model is given twice (--model tiny and model=other)"),
    ("finetune", ["--epochs", "2", "epochs=3"], "epochs is given twice (--epochs 2 and epochs=3)"),
])
def test_a_setting_given_twice_with_other_values_is_one_error(tmp_path, capsys, script, argv, message):
    code, err = run_cli(f"launch/{script}.py", [*argv, "--workdir", tmp_path / "w", "--dry-run"], capsys)
    assert code == 2
    one_clear_error(code, err, message)
    assert not (tmp_path / "w").exists()


def test_the_same_value_given_twice_is_accepted():
    from cancerllm_jax.train.config import PretrainConfig, resolve

    cfg = resolve(PretrainConfig, None, ["steps=3", "lora.rank=4", "lora={rank: 4}", "data.sources=[a.jsonl]",
                                         f"data.sources={os.path.abspath('a.jsonl')}", "optim.lr=1e-4",
                                         "optim.lr=0.0001"],
                  {"steps": 3, "mesh": None}, [("--data ./a.jsonl", "data.sources=./a.jsonl")])
    assert cfg.steps == 3 and cfg.lora.rank == 4 and [os.path.basename(s) for s in cfg.data.sources] == ["a.jsonl"]
    assert cfg.optim.lr == 1e-4  # the same number, written two ways (YAML reads 1e-4 as text)
    with pytest.raises(UserError, match=r"^steps is given twice \(--steps 3 and steps=4\)"):
        resolve(PretrainConfig, None, ["steps=4"], {"steps": 3})
    assert resolve(PretrainConfig, None, ["steps=3", "steps=4"]).steps == 4  # a program's list: the last one


def test_a_list_setting_given_as_one_existing_path_with_a_comma_is_that_path(tmp_path, monkeypatch):
    from cancerllm_jax.train.config import PretrainConfig, resolve

    (tmp_path / "a,b.jsonl").write_text('{"text": "x"}\n')
    cfg = resolve(PretrainConfig, None, [f"data.sources={tmp_path / 'a,b.jsonl'}"])
    assert [os.path.basename(s) for s in cfg.data.sources] == ["a,b.jsonl"]
    cfg = resolve(PretrainConfig, None, [f"data.sources={tmp_path / 'a'},{tmp_path / 'b.jsonl'}", "lora.targets=q,v"])
    assert [os.path.basename(s) for s in cfg.data.sources] == ["a", "b.jsonl"] and list(cfg.lora.targets) == ["q", "v"]
    (tmp_path / "q,v").mkdir()  # only a list of paths reads an existing path whole
    monkeypatch.chdir(tmp_path)
    assert list(resolve(PretrainConfig, None, ["lora.targets=q,v"]).lora.targets) == ["q", "v"]


# ------------------------------------------------------------------------------ reproduce.py --model checked first

def _tiny_hf(folder) -> None:
    """An HF folder of the tiny preset (zeros), without torch."""
    from safetensors.numpy import save_file

    from cancerllm_jax.checkpoint.hf import _hf_shapes
    from cancerllm_jax.config import PRESETS, to_hf_config

    cfg = PRESETS["tiny"]
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f)
    tensors = {}
    for name, shape in _hf_shapes(cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for i in range(cfg.num_layers) if ".*." in name else [None]:
            tensors[name.replace(".*.", f".{i}.")] = np.zeros(shape, np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def _truncate(folder) -> None:
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-100])


def _wrong_config(folder) -> None:
    path = os.path.join(folder, "config.json")
    hf = json.load(open(path))
    hf["intermediate_size"] += 8
    json.dump(hf, open(path, "w"))


@pytest.mark.parametrize("damage, needle", [(_truncate, "corrupt or not a safetensors file"),
                                            (_wrong_config, "expected")])
def test_reproduce_refuses_a_broken_model_before_making_anything(tmp_path, capsys, damage, needle):
    model = tmp_path / "model"
    _tiny_hf(model)
    _module("launch/reproduce.py").check_model(str(model))  # whole: accepted
    damage(model)
    out = tmp_path / "rep"
    code, err = run_cli("launch/reproduce.py", ["--scale", "cpu-small", "--model", model, "--out", out], capsys)
    assert code == 2
    one_clear_error(code, err, needle)
    assert not out.exists()


def test_a_failing_stage_is_one_error_line(tmp_path):
    rep = _module("launch/reproduce.py")
    pipe = rep.Pipeline(str(tmp_path / "rep"))
    cmd = [sys.executable, "-c", "import sys; print('note: working'); print('error: the child failed', "
                                 "file=sys.stderr); sys.exit(2)"]
    with pytest.raises(UserError) as e:
        pipe.stage("pretrain", str(tmp_path / "DONE"), {}, cmd)
    assert "\n" not in str(e.value) and "error:" not in str(e.value)
    assert str(e.value).startswith("stage pretrain failed (exit 2): the child failed (log: ")
    # a second attempt appends to the stage's log, and its error is its own, not the first attempt's
    with pytest.raises(UserError, match=r"failed \(exit 3\): crashed otherwise \(log: "):
        pipe.stage("pretrain", str(tmp_path / "DONE"), {}, [sys.executable, "-c",
                                                            "import sys; print('crashed otherwise'); sys.exit(3)"])
    log = open(tmp_path / "rep" / "logs" / "pretrain.log").read()
    assert log.count("=== ") == 2 and "the child failed" in log and log.rstrip().endswith("crashed otherwise")


# ------------------------------------------------------------------------------ make_synthetic_data.py counts

def test_make_synthetic_data_refuses_zero_pretraining_documents(tmp_path, capsys):
    out = tmp_path / "d"
    code, err = run_cli("tools/make_synthetic_data.py", ["--out", out, "--size", "10", "--pretrain-docs", "0"],
                        capsys)
    assert code == 2
    one_clear_error(code, err, "--pretrain-docs must be at least 1 (got 0)")
    assert not out.exists()


# ------------------------------------------------------------------------------ held-out examples in training

class _CharTok:
    """Just enough of a tokenizer for the data pipeline: one id per character."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [1] * add_bos + [3 + ord(c) % 200 for c in text] + [2] * add_eos


def test_held_out_examples_that_are_training_examples_are_one_warning(tmp_path, caplog):
    from cancerllm_jax.data.instruct import InstructDataConfig, _warn_held_out_in_training

    rows = [{"instruction": f"Q{i}", "context": f"secret note {i}", "response": f"A{i}"} for i in range(6)]
    train, copy = tmp_path / "train.jsonl", tmp_path / "copy.jsonl"
    for path in (train, copy):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = InstructDataConfig(path=str(train), eval_path=str(copy))
    with caplog.at_level(logging.WARNING):
        _warn_held_out_in_training(cfg, rows, [dict(r) for r in rows])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "secret note" not in warnings[0]
    assert warnings[0].startswith(f"{copy}: 6 of 6 held-out examples are also training examples in {train} "
                                  "(same instruction, context and response)")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _warn_held_out_in_training(cfg, rows, [rows[0], {"instruction": "Q", "context": "", "response": "other"}])
        _warn_held_out_in_training(cfg, rows[:3], rows[3:])  # disjoint: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and ": 1 of 2 held-out examples" in warnings[0]


def test_finetune_warns_when_the_eval_file_is_a_copy_of_the_training_file(tmp_path, capsys, caplog):
    rows = [{"instruction": f"Q{i}", "context": f"c{i}", "response": f"A{i}"} for i in range(4)]
    train, copy = tmp_path / "train.jsonl", tmp_path / "copy.jsonl"
    for path in (train, copy):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from cancerllm_jax.data.instruct import InstructDataConfig, build_instruct_data

    with caplog.at_level(logging.WARNING):
        build_instruct_data(InstructDataConfig(path=str(train), eval_path=str(copy), max_seq_len=512), _CharTok())
    assert [r.getMessage()[:len(f"{copy}: 4 of 4")] for r in caplog.records
            if r.levelno == logging.WARNING] == [f"{copy}: 4 of 4"]


def test_save_and_eval_every_take_a_fraction_of_the_run_as_hf_does():
    """HF Trainer reads save_steps / eval_steps below 1 as a share of the run: ceil(max_steps x ratio)."""
    from cancerllm_jax.launch_common import _steps_or_fraction
    from cancerllm_jax.train.config import PretrainConfig, resolve

    cfg = resolve(PretrainConfig, None, ["steps=16001", "eval_every=0.2", "save_every=500"])
    cfg.validate()
    assert (cfg.every("eval_every"), cfg.every("save_every")) == (3201, 500)
    assert resolve(PretrainConfig, None, ["steps=5", "eval_every=1.0"]).every("eval_every") == 1  # one step
    assert (_steps_or_fraction("7"), _steps_or_fraction("0.25")) == (7, 0.25)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected a whole number of steps or a fraction"):
        _steps_or_fraction("abc")
    for bad in ("eval_every=1.5", "save_every=-0.2"):
        with pytest.raises(UserError, match=r"(save|eval)_every must be"):
            resolve(PretrainConfig, None, ["steps=5", bad]).validate()


def test_pretrain_with_fractional_save_and_eval_every_saves_at_those_steps(tmp_path, capsys):
    wd = tmp_path / "w"
    code, err = run_cli("launch/pretrain.py", ["--mesh", "1x1", "--steps", "5", "--batch-size", "2", "--save-every",
                                               "0.4", "eval_every=0.5", "data.block_size=32", "lora.rank=2",
                                               "synthetic_documents=20", "--workdir", wd], capsys)
    assert code == 0, err
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 5]
    evals = [json.loads(line)["step"] for line in open(wd / "metrics.jsonl") if "eval_loss" in line]
    assert evals == [0, 3, 5]
