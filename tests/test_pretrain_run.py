"""LoRA continued pretraining end to end: meshes, resume, kill -9, two processes, bad inputs, load(), dry-run.

In-process through ``Trainer`` where possible (tests/conftest.py gives this process 10 CPU devices); subprocesses
only where the test is about the CLI or needs its own process. Tiny settings keep the file short on a 2-core CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jax
from flax import nnx

import cancerllm_jax as cj
from cancerllm_jax.train import run_io
from cancerllm_jax.train.config import PretrainConfig, resolve
from cancerllm_jax.train.loop import NonFiniteLoss, Trainer
from cancerllm_jax.train.pretrain import pretrain_data_factory
from helpers import one_clear_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Start the backend now, with conftest's 10 host devices: a launcher's main() run in this process before it
# started would otherwise leave only the devices of that run's mesh.
jax.devices()
LAUNCHER = os.path.join(ROOT, "launch", "pretrain.py")
STEPS = 6
TINY = [f"steps={STEPS}", "batch_size=10", "data.block_size=32", "synthetic_documents=40", "lora.rank=4",
        "data.eval_fraction=0", "save_every=1"]
TINY_CLI = [f"--steps={STEPS}", "--batch-size=10", "data.block_size=32", "synthetic_documents=40", "lora.rank=4",
            "data.eval_fraction=0", "--save-every=1"]


def make_trainer(workdir, mesh="10x1", extra=(), resume=False) -> Trainer:
    cfg = resolve(PretrainConfig, None, [*TINY, f"mesh={mesh}", *extra])
    return Trainer(cfg, str(workdir), "pretrain", pretrain_data_factory(cfg, lambda _: None), resume=resume)


def losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r]


def final_lora(workdir) -> dict:
    from cancerllm_jax.checkpoint.orbax_io import restore_tree

    step = run_io.latest_step(os.path.join(workdir, "checkpoints"))
    state = restore_tree(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, state["params"])


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher picks the device count
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra})
    return env


def launch(args, timeout=240, **env):
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env), cwd=ROOT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run on mesh 10x1: the Trainer (kept for its model) and its workdir."""
    wd = tmp_path_factory.mktemp("ref10x1")
    trainer = make_trainer(wd)
    trainer.run()
    return trainer, str(wd)


# ------------------------------------------------------------------------------------------- meshes & resume

def test_meshes_give_the_same_losses(reference, tmp_path):
    """10x1, 1x1 and 2x5 with the same global batch and seed. Not bitwise: the data-parallel gradient sums and the
    model-axis matmuls are reduced in a different order on each mesh (float addition is not associative)."""
    ref = losses(reference[1])
    assert len(ref) == STEPS
    for mesh in ("1x1", "2x5"):
        make_trainer(tmp_path / mesh, mesh).run()
        got = losses(tmp_path / mesh)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"mesh {mesh}")
    print(f"\nmax relative loss difference vs 10x1: "
          f"{max(abs(a - b) / abs(b) for m in ('1x1', '2x5') for a, b in zip(losses(tmp_path / m), ref)):.2e}")


def test_stop_and_resume_is_bitwise(reference, tmp_path):
    """Stopped after step 3 and resumed in a fresh Trainer: the same losses and final LoRA weights, bit for bit
    (same mesh, same compiled step, the data iterator and the RNG restored from the checkpoint)."""
    make_trainer(tmp_path).run(stop_after=3)
    assert run_io.latest_step(str(tmp_path / "checkpoints")) == 3 and len(losses(tmp_path)) == 3
    make_trainer(tmp_path, resume=True).run()
    assert losses(tmp_path) == losses(reference[1])
    assert_trees_equal(final_lora(str(tmp_path)), final_lora(reference[1]))


def test_per_layer_weights_train_as_the_stacked_scan(reference, tmp_path):
    """``layer_weights=per_layer`` (the default on a GPU): the frozen layer weights one array per layer, sharded as
    the stacked ones without the layer axis (mesh 2x5), the layers a Python loop.
    Stopped after 3 steps and resumed with the stacked scan (a resumable change): the reference's losses; the base
    it saved (restacked) is the reference's; a dry run compiles it."""
    from cancerllm_jax.checkpoint.orbax_io import restore_tree

    trainer = make_trainer(tmp_path, "2x5", ["layer_weights=per_layer"])
    layers = trainer.frozen["layers"]
    assert trainer.per_layer and isinstance(layers, list) and len(layers) == trainer.model_cfg.num_layers
    # embed over data (FSDP); the tiny model's 4 heads do not divide the model axis (5): replicated there
    assert tuple(layers[1]["q"]["kernel"].sharding.spec) == ("data", None)
    assert layers[1]["q"]["kernel"].shape == reference[0].frozen["layers"]["q"]["kernel"].shape[1:]
    trainer.run(stop_after=3)
    make_trainer(tmp_path, "2x5", resume=True).run()
    np.testing.assert_allclose(losses(tmp_path), losses(reference[1]), rtol=1e-5)
    assert_trees_equal(restore_tree(str(tmp_path / "base" / "params")),
                       restore_tree(os.path.join(reference[1], "base", "params")))
    cfg = resolve(PretrainConfig, None, [*TINY, "mesh=2x5", "layer_weights=per_layer"])
    dry = Trainer(cfg, str(tmp_path / "dry"), "pretrain", None, dry_run=True)
    assert isinstance(dry.frozen["layers"], list) and "frozen    layers.*.q.kernel" in dry.describe(32, True)


def test_per_layer_weights_never_delete_the_callers_base(tmp_path):
    """Base params handed to the Trainer as JAX arrays in the train dtype become the model's own arrays, and
    ``device_put`` onto the mesh can return new Arrays over the same buffers: splitting them per layer must not
    delete what the caller still holds (a second Trainer from one loaded base, an lr sweep)."""
    from cancerllm_jax.config import PRESETS
    from cancerllm_jax.model import create_model

    model_cfg = PRESETS["tiny"]
    params = nnx.to_pure_dict(nnx.state(create_model(model_cfg, None, "float32", "float32", "none", seed=0)))
    cfg = resolve(PretrainConfig, None, [*TINY, "mesh=1x1", "layer_weights=per_layer"])
    base = (model_cfg, params, None, {"kind": "preset", "name": "tiny", "seed": 0})
    for i in range(2):
        trainer = Trainer(cfg, str(tmp_path / str(i)), "pretrain", pretrain_data_factory(cfg, lambda _: None),
                          base=base)
        assert trainer.per_layer and not any(x.is_deleted() for x in jax.tree.leaves(params))
    trainer.run(stop_after=1)


def test_resume_from_another_folder_reads_the_same_files(tmp_path, monkeypatch):
    """Paths were recorded as typed, relative to the folder the run started in: --resume from another folder (a job
    script) was refused as "config differs in data.sources". They are recorded absolute; a run recorded before,
    with relative paths, still resumes from the folder it started in."""
    docs = tmp_path / "a" / "notes.jsonl"
    docs.parent.mkdir()
    docs.write_text("".join(json.dumps({"text": f"pt {i} w/ nsclc, ecog {i % 3}. " * 8}) + "\n" for i in range(30)))
    wd = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    make_trainer(wd, "1x1", ["data.sources=[notes.jsonl]"]).run(stop_after=2)
    meta = json.loads((wd / run_io.RUN_FILE).read_text())
    assert meta["config"]["data"]["sources"] == [str(docs)]
    monkeypatch.chdir(tmp_path)
    make_trainer(wd, "1x1", ["data.sources=[a/notes.jsonl]"], resume=True).run(stop_after=3)
    assert run_io.latest_step(str(wd / "checkpoints")) == 3
    meta = json.loads((wd / run_io.RUN_FILE).read_text())
    meta["config"]["data"]["sources"] = ["notes.jsonl"]  # as a run recorded it before
    run_io.write_json_atomic(str(wd / run_io.RUN_FILE), meta)
    monkeypatch.chdir(tmp_path / "a")
    make_trainer(wd, "1x1", [f"data.sources=[{docs}]"], resume=True).run(stop_after=4)
    assert run_io.latest_step(str(wd / "checkpoints")) == 4


def test_resume_refuses_other_data_base_model_or_process_count(reference, tmp_path):
    """What no config key shows but changes the run: the training data (its counts), the base model's config
    (an HF folder edited in place) and the number of processes (the data position is saved per process). Each is
    refused with one clear error instead of a run that quietly differs (or a "corrupt checkpoint" message)."""
    import shutil

    from cancerllm_jax.errors import UserError

    wd = tmp_path / "run"
    shutil.copytree(reference[1], wd)
    meta_path = wd / run_io.RUN_FILE
    meta = json.loads(meta_path.read_text())

    def refused(edit, *words):
        run_io.write_json_atomic(str(meta_path), edit(json.loads(json.dumps(meta))))
        with pytest.raises(UserError) as e:
            make_trainer(wd, resume=True).run()
        assert all(w in str(e.value) for w in words), str(e.value)
        run_io.write_json_atomic(str(meta_path), meta)

    refused(lambda m: {**m, "data_counts": {**m["data_counts"], "train_tokens": m["data_counts"]["train_tokens"] + 1}},
            "training data differs", "train_tokens")
    refused(lambda m: {**m, "data_counts": {**m["data_counts"], "digest": "0" * 16}},  # same counts, other text
            "training data differs", "other text or the lines in another order")
    # a count the saved run lacks (a fine-tuning run started without --eval-data has no eval digest) is a change,
    # unless this version added it since
    refused(lambda m: {**m, "data_counts": {k: v for k, v in m["data_counts"].items() if k != "train_tokens"}},
            "training data differs", "train_tokens")
    old_run = json.loads(json.dumps(meta))
    del old_run["data_counts"]["digest"]  # a run saved before digests: its counts are still checked, and enough
    del old_run["data_counts"]["repeated_documents"]  # nor a count added since refuses the resume
    run_io.write_json_atomic(str(meta_path), old_run)
    make_trainer(wd, resume=True).run()
    run_io.write_json_atomic(str(meta_path), meta)
    refused(lambda m: {**m, "model": {**m["model"], "rope_theta": 1.0}}, "base model", "rope_theta")
    data = wd / "checkpoints" / str(STEPS) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    refused(lambda m: m, "2 process", "--num-processes 2")


def test_a_second_run_in_a_busy_workdir_is_refused(reference, tmp_path):
    """A relaunch while the run still trains (both would write checkpoints and metrics.jsonl) is refused at once."""
    import shutil

    from cancerllm_jax.errors import UserError

    wd = tmp_path / "run"
    shutil.copytree(reference[1], wd)
    with run_io.FolderLock(str(wd), "--workdir"):  # the first run, as flock sees it
        with pytest.raises(UserError, match=r"--workdir .*run is in use by another command \(process \d+"):
            make_trainer(wd, resume=True).run()
    make_trainer(wd, resume=True).run()  # released: a finished run resumes to nothing
    assert not (wd / run_io.LOCK_FILE).exists()


def test_a_filesystem_without_locks_runs_unguarded(tmp_path, monkeypatch):
    """flock failing for another reason than a holder (ENOLCK on some network mounts) is not "in use"."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with run_io.FolderLock(str(tmp_path), "--workdir"):
        pass
    assert not (tmp_path / run_io.LOCK_FILE).exists()


def test_kill_9_then_resume(reference, tmp_path):
    """A launcher killed with SIGKILL after a checkpoint was written, then ``--resume``: same weights and losses."""
    wd = str(tmp_path / "run")
    args = ["--mesh", "10x1", "--workdir", wd, *TINY_CLI]
    proc = subprocess.Popen([sys.executable, LAUNCHER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=ROOT)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            rows = losses(wd) if os.path.isfile(os.path.join(wd, "metrics.jsonl")) else []
            if len(rows) >= 2 and (run_io.latest_step(os.path.join(wd, "checkpoints")) or 0) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = run_io.latest_step(os.path.join(wd, "checkpoints"))
    assert killed_at < STEPS
    res = launch(["--resume", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {killed_at}" in res.stderr
    assert losses(wd) == losses(reference[1])
    assert_trees_equal(final_lora(wd), final_lora(reference[1]))


def _two_processes(args: list[str]) -> list[str]:
    """Run the launcher as 2 processes of one run on a free local port; their outputs (both must exit 0).
    Process 0 gets the flags; process 1 the variables a cluster launcher sets (Slurm's srun task count and rank,
    JAX's coordinator address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    cluster = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    procs = [subprocess.Popen([sys.executable, LAUNCHER, *args, *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=child_env(**env), cwd=ROOT)
             for extra, env in ((flags, {}), ([], cluster))]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    return outs


def test_two_processes_equal_one(reference, tmp_path):
    """2 processes x 5 CPU devices (a 10x1 mesh over both) give the 1-process 10-device run's losses."""
    wd = str(tmp_path / "mp")
    outs = _two_processes(["--mesh", "10x1", "--workdir", wd, *TINY_CLI])
    np.testing.assert_allclose(losses(wd), losses(reference[1]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(final_lora(wd)), jax.tree.leaves(final_lora(reference[1]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert "workdir:" not in outs[1]  # only process 0 reports


# ------------------------------------------------------------------------------------------------- bad inputs

def _launcher_module(path=LAUNCHER):
    """A CLI script (launch/pretrain.py by default) as a module."""
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f"cli_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(argv, capsys) -> tuple[int, str]:
    """The launcher's ``main`` in this process: (exit code, stderr)."""
    main = _launcher_module().main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err




def test_data_paths_with_commas_and_list_overrides_after_data(tmp_path, capsys):
    """``--data a.jsonl "b,2024.jsonl" data.weights=[3,1]``: a comma in a file name does not split it, and a
    key=value with a list after --data is an override (both were read as data paths: "no such file")."""
    for n, name in enumerate(("a.jsonl", "b,2024.jsonl")):
        (tmp_path / name).write_text("".join(json.dumps({"text": f"Patient {i}: stage {n} NSCLC, adenocarcinoma of "
                                                                 "the right upper lobe."}) + "\n" for i in range(30)))
    code, err = run_main(["--mesh", "1x1", "--workdir", str(tmp_path / "run"), *TINY_CLI, "--steps=1",
                          "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "b,2024.jsonl"), "data.weights=[3,1]"],
                         capsys)
    assert code in (0, None), err
    assert "a.jsonl: weight 3.0" in err and "b,2024.jsonl: weight 1.0" in err, err
    assert err.count("passes over the run") == 2, err


def test_a_source_its_weight_repeats_while_another_is_unread_is_named():
    """How often the run reads each source (rows split by weight), and a warning when a small source is read twice
    or more while another is not read through once (the mixture silently repeated it)."""
    from cancerllm_jax.train.loop import oversampling_warning, source_passes

    sources = [{"name": "big", "weight": 1.0, "train_blocks": 1000}, {"name": "small", "weight": 1.0,
                                                                       "train_blocks": 10}]
    passes = source_passes(sources, 200)
    assert passes == [0.1, 10.0]
    assert "source small is read ≈10 times over the run" in oversampling_warning(sources, passes)
    assert oversampling_warning(sources, source_passes(sources, 10)) is None  # nothing read twice
    assert oversampling_warning(sources, source_passes(sources, 4000)) is None  # every source read through


def test_bad_inputs_each_give_one_clear_error(reference, tmp_path, capsys):
    wd = str(tmp_path / "w")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine note"}\n{"text": "broken\n', encoding="utf-8")
    code, err = run_main(["--data", str(bad), "--workdir", wd, *TINY_CLI], capsys)
    one_clear_error(code, err, "bad.jsonl", ":2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    code, err = run_main(["--data", str(empty), "--workdir", wd, *TINY_CLI], capsys)
    one_clear_error(code, err, "empty.jsonl")
    code, err = run_main(["--workdir", wd, *TINY_CLI, "lora.rnak=4"], capsys)
    one_clear_error(code, err, "rnak", "rank")
    code, err = run_main(["--workdir", wd, "--mesh", "10by1", *TINY_CLI], capsys)
    one_clear_error(code, err, "10by1")
    code, err = run_main(["--workdir", wd, "--mesh", "2x5", *TINY_CLI, "--batch-size=5"], capsys)
    one_clear_error(code, err, "not divisible", "2x5")
    code, err = run_main(["--workdir", wd, "--mesh", "4x5", *TINY_CLI], capsys)  # 20 devices; 10 exist
    one_clear_error(code, err, "4x5", "20 devices", "10 cpu")
    # --resume of the reference run with another LoRA rank: refused before anything is written
    before = sorted(os.listdir(reference[1]))
    code, err = run_main(["--workdir", reference[1], "--resume", "--mesh", "10x1",
                          *[a for a in TINY_CLI if a != "lora.rank=4"], "lora.rank=8"], capsys)
    one_clear_error(code, err, "--resume", "lora.rank")
    assert sorted(os.listdir(reference[1])) == before
    assert not os.path.exists(wd)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    wd = str(tmp_path / "nan")
    code, err = run_main(["--workdir", wd, "--mesh", "1x1", *TINY_CLI, "optim.lr=1e30", "optim.clip_norm=0"],
                         capsys)
    line = one_clear_error(code, err, "stopped without saving", "last checkpoint", "new --workdir")
    ckpts = os.path.join(wd, "checkpoints")
    bad_step = int(re.search(r"(?:at|update of) step (\d+)", line).group(1))
    good = run_io.latest_step(ckpts)
    assert good is not None and good < bad_step
    assert all(int(n) < bad_step for n in os.listdir(ckpts) if n.isdigit())
    assert all(np.isfinite(losses(wd)))
    assert np.isfinite(cj.load(wd).logits(np.arange(1, 9))).all()  # the checkpoint kept is a working model


@pytest.mark.parametrize("eval_fraction", [0, 0.2])
def test_a_last_update_that_diverges_is_never_saved_as_a_finished_run(tmp_path, capsys, eval_fraction):
    """The step's loss is computed before its update: a last update that makes the model diverge was saved as a
    finished run (exit 0, "done") whose logits are NaN; with eval data its eval loss was logged as nan. Now the
    weights are checked before every save, and a non-finite eval loss stops the run."""
    wd = str(tmp_path / "run")
    code, err = run_main(["--workdir", wd, "--mesh", "1x1", *[a for a in TINY_CLI if a != "data.eval_fraction=0"],
                          "--steps=1", f"data.eval_fraction={eval_fraction}", "optim.lr=1e30", "optim.clip_norm=0",
                          "optim.warmup_ratio=0"], capsys)
    one_clear_error(code, err, "step 1" if eval_fraction else "the update of step 1 made the loss non-finite",
                    "No checkpoint was saved")
    assert run_io.latest_step(os.path.join(wd, "checkpoints")) is None


def test_non_finite_gradient_with_a_finite_loss_is_never_saved(tmp_path):
    """A step whose loss is finite but whose gradient is not (bf16 overflow in the backward pass) has already made
    the new weights NaN: the run stops there, and the last checkpoint is the step before."""
    trainer = make_trainer(tmp_path, "1x1")
    step_fn, calls = trainer.step_fn, []

    def poisoned(state, frozen, batch):
        state, metrics = step_fn(state, frozen, batch)
        calls.append(1)
        if len(calls) == 3:
            state = {**state, "params": jax.tree.map(lambda x: x * np.nan, state["params"])}
            metrics = {**metrics, "grad_norm": metrics["grad_norm"] * np.inf}
        return state, metrics

    poisoned.lower = step_fn.lower  # for the memory estimate
    trainer.step_fn = poisoned
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        trainer.run()
    assert run_io.latest_step(str(tmp_path / "checkpoints")) == 2
    assert len(losses(tmp_path)) == 2 and all(np.isfinite(losses(tmp_path)))


def test_resuming_a_finished_run_adds_no_rows(tmp_path):
    """``--resume`` of a run that already reached its last step evaluates nothing again (no duplicate rows)."""
    extra = ["steps=2", "data.eval_fraction=0.2", "save_every=0"]
    make_trainer(tmp_path, "1x1", extra).run()
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        before = f.read()
    assert '"eval_loss"' in before
    make_trainer(tmp_path, "1x1", extra, resume=True).run()
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        assert f.read() == before


def test_resume_drops_unreadable_metrics_lines_with_a_warning(tmp_path, capsys):
    """Stray bytes, a JSON list or a row without a step in metrics.jsonl stopped a resume after "resumed from step"
    with "unexpected UnicodeDecodeError ... this is a bug": they are dropped, counted and named; the rows stay."""
    extra = ["steps=2", "save_every=0"]
    make_trainer(tmp_path, "1x1", extra).run()
    path = tmp_path / "metrics.jsonl"
    before = path.read_text(encoding="utf-8")
    with open(path, "ab") as f:
        f.write(b'\xff\xfe garbage\n[1, 2]\n{"loss": 1.0}\n{"step": 1, "lo')  # the last one cut by a kill
    capsys.readouterr()
    make_trainer(tmp_path, "1x1", extra, resume=True).run()
    assert path.read_text(encoding="utf-8") == before
    first = before.count("\n") + 1
    assert f"3 unreadable line(s) dropped (first: line {first})" in capsys.readouterr().err


def test_a_large_preset_base_not_saved_is_remade_as_the_run_made_it(tmp_path, monkeypatch):
    """A LoRA run on a preset too large to save (2e9+ parameters: ``base`` is the preset's name and seed) is loaded
    on the base it was trained on: remade with the run's LoRA factors, which draw from the same seeded stream (it was
    remade without them: other weights, logits off by ~1)."""
    from cancerllm_jax.config import ModelConfig

    monkeypatch.setattr(ModelConfig, "num_params", lambda self: 3e9)
    trainer = make_trainer(tmp_path, "1x1", ["steps=1"])
    trainer.run()
    assert json.load(open(tmp_path / "run.json"))["base"]["kind"] == "preset"
    ids = np.array([[1, 851, 349, 22, 5000, 77, 31000, 4]], np.int32)
    model = trainer.parts.merge(jax.device_get(trainer.state["params"]), jax.device_get(trainer.frozen))
    own = np.asarray(model(jax.numpy.asarray(ids))[0])
    np.testing.assert_allclose(cj.load(str(tmp_path)).logits(ids), own, atol=1e-5, rtol=0)


def test_cpu_device_count_from_xla_flags_is_replaced_and_said(tmp_path):
    """XLA_FLAGS forcing 2 host devices and ``--mesh 10x1``: the launcher provides 10 and says so (CPU only)."""
    res = launch(["--mesh", "10x1", "--dry-run", "--workdir", str(tmp_path), *TINY_CLI],
                 XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "providing 10 host devices for the mesh instead of the 2 that XLA_FLAGS asks for" in res.stderr
    assert "mesh 10x1 on 10 cpu device(s)" in res.stdout


def test_tensorboard_shows_what_metrics_jsonl_keeps_after_a_resume(tmp_path):
    """After a kill and a resume from step k, TensorBoard's events are metrics.jsonl's rows up to k (written anew:
    tensorboardX flushes in the background, so a kill lost up to 120 s of them) and then the new ones, each once."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    from cancerllm_jax.train.loop import _MetricsLog

    def scalars(folder):
        out = []
        for path in sorted(glob.glob(os.path.join(folder, "tb", "*"))):
            data, i = open(path, "rb").read(), 0
            while i + 12 <= len(data):
                n = struct.unpack("<Q", data[i:i + 8])[0]
                ev = event_pb2.Event()
                ev.ParseFromString(data[i + 12:i + 12 + n])
                i += 12 + n + 4
                out += [(ev.step, v.tag, round(v.simple_value, 4)) for v in ev.summary.value]
        return sorted(out)

    log = _MetricsLog(str(tmp_path), 0)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 10.0 - step, **({"eval_loss": 9.5} if step == 2 else {})})
    log.f.close()  # killed: the TensorBoard writer is never closed
    log = _MetricsLog(str(tmp_path), 2)  # resumed from the checkpoint of step 2
    log.write({"step": 3, "loss": 6.5})
    log.close()
    assert scalars(tmp_path) == [(1, "loss", 9.0), (2, "eval_loss", 9.5), (2, "loss", 8.0), (3, "loss", 6.5)]


def test_the_metrics_log_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (the tests' extra installs it): ~2-4 s of every launcher's
    start on a 2-core host, for torch tensors this loop never logs. The writer is imported without it, still writes
    its events, and torch imports normally afterwards."""
    code = ("import sys; from cancerllm_jax.train.loop import _MetricsLog\n"
            f"log = _MetricsLog({str(tmp_path)!r}, 0); log.write({{'step': 1, 'loss': 2.0}}); log.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import torch; print(torch.ones(1).item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "1.0", out.stderr[-3000:]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))


def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path):
    """SIGTERM (a pre-empting scheduler) stops a training run after the step under way, which it saves: exit 143
    with one line, no unfinished checkpoint folder, the latest checkpoint is the last logged step and restores (the
    process died at once, often mid-save, losing the steps since the last save)."""
    import signal

    wd = tmp_path / "run"
    args = ["--workdir", str(wd), "--mesh", "1x1", "--steps", "100000", "--batch-size", "2", "data.block_size=32",
            "synthetic_documents=40", "lora.rank=4", "data.eval_fraction=0", "--save-every", "7", "log_every=1"]
    proc = subprocess.Popen([sys.executable, LAUNCHER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env(), cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step 1/"):
            break
    time.sleep(1.0)  # a few steps, and their checkpoints, in flight
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "terminated (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
    left = os.listdir(wd / "checkpoints")
    assert left and all(n.isdigit() for n in left), left  # no *.orbax-checkpoint-tmp folder
    with open(wd / "metrics.jsonl", encoding="utf-8") as f:
        assert max(map(int, left)) == [json.loads(line) for line in f][-1]["step"]
    assert run_io.read_run_weights(str(wd)).lora_params  # the latest checkpoint restores: what --resume reads


def test_unknown_key_from_the_command_line_exits_2_without_traceback():
    res = launch(["lora.rnak=4"], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("error: override 'lora.rnak': unknown key 'rnak' "
                                                   "(did you mean 'rank'?)")


# ------------------------------------------------------------------------------------- outputs, load, dry-run

def test_run_folder_contents(reference):
    wd = reference[1]
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all("loss" in r for r in rows)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(wd, "tb")))
    for name in ("config.yaml", "run.json", "base/cancerllm.json"):
        assert os.path.isfile(os.path.join(wd, name)), name
    assert run_io.read_run_meta(wd)["config"]["lora"]["rank"] == 4


def test_load_equals_the_trainers_model(reference):
    import cancerllm_jax as cj

    trainer, wd = reference
    model = trainer.parts.merge(jax.device_get(trainer.state["params"]), jax.device_get(trainer.frozen))
    ids = np.random.default_rng(0).integers(0, 32000, size=(2, 24))
    ours = np.asarray(model(jax.numpy.asarray(ids, jax.numpy.int32))[0], np.float32)
    unmerged = cj.load(wd, merge_lora=False).logits(ids)
    np.testing.assert_allclose(unmerged, ours, rtol=0, atol=1e-5)
    merged = cj.load(wd).logits(ids)  # LoRA folded into the kernels in fp32: equal up to rounding
    np.testing.assert_allclose(merged, ours, rtol=0, atol=1e-4)
    assert np.abs(np.asarray(trainer.state["params"]["layers"]["q"]["lora_b"])).max() > 0  # LoRA did train


def test_a_saved_preset_base_exports_with_the_runs_tokenizer(reference, tmp_path):
    """The adapter export tells users to `to-hf` the run's base/ for peft: that folder had weights and no tokenizer
    (its export a model without one). base/ now holds the run's tokenizer files, and its export the same ones the
    run's own export has."""
    import cancerllm_jax as cj

    convert = _launcher_module(os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    _, wd = reference
    assert os.path.isfile(os.path.join(wd, "base", "tokenizer.model"))
    assert convert.main(["to-hf", os.path.join(wd, "base"), str(tmp_path / "base_hf")]) == 0
    assert convert.main(["to-hf", wd, str(tmp_path / "run_hf")]) == 0
    tokenizer_files = [sorted(n for n in os.listdir(tmp_path / d) if n.startswith("tokenizer")) for d in
                       ("base_hf", "run_hf")]
    assert tokenizer_files[0] == tokenizer_files[1] == ["tokenizer.model"], tokenizer_files
    text = "pt w/ nsclc, ecog 1"
    assert (cj.load(str(tmp_path / "base_hf")).tokenizer.encode(text, bos=True)
            == cj.load(wd).tokenizer.encode(text, bos=True))


def test_every_eos_id_of_an_hf_base_is_kept_by_its_run_and_exports(tmp_path):
    """A base whose generation_config.json lists EOS ids [2, 13]: its run and the run's to-hf export name both, as the
    base folder does (and as transformers' generate stops at both); so does a from-hf checkpoint without the copied
    generation_config.json, and a run written before run.json recorded the list."""
    import shutil

    import torch
    import transformers

    import cancerllm_jax as cj

    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=64)).save_pretrained(str(base))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 13]}))
    assert cj.load(str(base)).eos_ids == (2, 13)
    wd = tmp_path / "run"
    make_trainer(wd, mesh="1x1", extra=[f"model={base}", "steps=1", "batch_size=2", "save_every=0"]).run()
    assert cj.load(str(wd)).eos_ids == (2, 13)
    assert run_io.read_run_meta(str(wd))["model"]["eos_token_ids"] == [2, 13]
    convert = _launcher_module(os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    out = tmp_path / "hf"
    convert.to_hf(str(wd), str(out))
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 13]
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == [2, 13]
    assert cj.load(str(out)).eos_ids == (2, 13)
    ckpt = tmp_path / "ckpt"
    convert.from_hf(str(base), str(ckpt))
    os.remove(ckpt / "generation_config.json")
    assert cj.load(str(ckpt)).eos_ids == (2, 13)
    old = tmp_path / "old_run"  # run.json as older versions wrote it: model.eos_token_id only
    shutil.copytree(wd, old)
    meta = run_io.read_run_meta(str(old))
    del meta["model"]["eos_token_ids"]
    run_io.write_json_atomic(str(old / run_io.RUN_FILE), meta)
    assert cj.load(str(old)).eos_ids == (2, 13)
    os.rename(base, tmp_path / "moved")  # the run reads its base from there: the error says so, not just "not found"
    with pytest.raises(cj.UserError, match=r"the base model it was trained on, .*base \(run.json: base.path\)"):
        cj.load(str(wd))


def test_exports_of_a_run_on_the_built_in_tokenizer_carry_it(reference, tmp_path, capsys):
    """A run on ``mistral-v1`` (the default tokenizer, the 7B config's) was exported without any tokenizer file:
    the shipped file is named tokenizer.model.v1, which the copy skipped. A preset's adapter names the run's saved
    base (not the preset name, which nothing loads) and says how to export it for peft."""
    convert = _launcher_module(os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    convert.to_hf(reference[1], str(tmp_path / "hf"))
    assert "tokenizer.model" in os.listdir(tmp_path / "hf")
    assert cj.load(str(tmp_path / "hf")).tokenizer.encode("pt w/ nsclc", bos=True) == \
        cj.load(reference[1]).tokenizer.encode("pt w/ nsclc", bos=True)
    convert.to_hf(reference[1], str(tmp_path / "peft"), mode="peft")
    assert "tokenizer.model" in os.listdir(tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == os.path.join(os.path.abspath(reference[1]), "base")
    assert "to-hf " + conf["base_model_name_or_path"] in capsys.readouterr().err


def test_a_step_folder_without_its_state_is_named_not_skipped(reference, tmp_path):
    """A step folder left without state/ (a user who removed only the folder an error named) was skipped silently by
    load, and --resume then collided with it in Orbax ("this is a bug")."""
    import shutil

    wd = tmp_path / "run"
    shutil.copytree(reference[1], wd)
    shutil.rmtree(wd / "checkpoints" / str(STEPS) / "state")
    for call in (lambda: cj.load(str(wd)), lambda: make_trainer(wd, resume=True).run()):
        with pytest.raises(cj.UserError, match=f"checkpoints/{STEPS}: incomplete checkpoint .*remove the whole folder"):
            call()
    shutil.rmtree(wd / "checkpoints" / str(STEPS))
    assert run_io.latest_step(str(wd / "checkpoints")) == STEPS - 1


def test_dry_run_prints_memory_estimate_and_exits_0(tmp_path, capsys):
    code = _launcher_module().main(["--dry-run", "--mesh", "10x1", "--workdir", str(tmp_path / "d"), *TINY_CLI])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory estimate per device (compiled step):" in out and "GiB" in out
    assert "layers.q.lora_a" in out and "P(" in out
    assert not os.path.exists(tmp_path / "d")  # nothing written


def test_a_data_shard_may_not_span_processes(monkeypatch):
    """Each process feeds its own rows, so in a multi-process run the data axis must be a multiple of the process
    count: with 2 processes a 1x10 mesh would infer a half-size batch whose replicas differ between the processes
    (each host trains on its own rows, silently)."""
    from cancerllm_jax import sharding
    from cancerllm_jax.errors import UserError

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="data axis"):
        sharding.make_mesh((1, 10))
    assert sharding.make_mesh((2, 5)).shape == {"data": 2, "model": 5}


def test_optimizer_state_takes_each_params_sharding():
    """Full fine-tuning on 2x2: q [embed, heads] and o [heads, embed] have one shape but transposed specs; each
    Adam moment is laid out like its own parameter (not like another of the same shape)."""
    cfg = resolve(PretrainConfig, None, ["mesh=2x2", "full=true", "batch_size=4", "data.block_size=32"])
    trainer = Trainer(cfg, str(ROOT), "pretrain", None, dry_run=True)
    q, o = (trainer.trainable_sh["layers"][n]["kernel"].spec for n in ("q", "o"))
    assert q != o
    import optax

    adam = [s for s in jax.tree.leaves(trainer.opt_sh, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert adam
    for st in adam:
        for moment in (st.mu, st.nu):
            assert jax.tree.map(lambda s: s.spec, moment) == jax.tree.map(lambda s: s.spec, trainer.trainable_sh)


def test_eval_runs_in_the_train_steps_micro_batches():
    """With ``grad_accum`` the eval forward takes the global batch in the same micro-batches as the train step (its
    whole-batch logits may not fit where the micro-batches' do): a quarter of the temporaries, the same sums."""
    from cancerllm_jax.train.step import BATCH_KEYS

    rng = np.random.default_rng(0)
    local = {k: rng.integers(1, 100, (8, 64)).astype(np.int32) for k in BATCH_KEYS}
    local["loss_mask"] = (rng.random((8, 64)) > 0.5).astype(np.int32)
    temps, sums = [], []
    for accum in (1, 4):
        cfg = resolve(PretrainConfig, None, ["mesh=1x1", "batch_size=8", "data.block_size=64", "lora.rank=4",
                                             f"optim.grad_accum={accum}"])
        trainer = Trainer(cfg, str(ROOT), "pretrain", None)
        batch = {k: jax.device_put(v, trainer.batch_sh) for k, v in local.items()}
        compiled = trainer.eval_fn.lower(trainer.state["params"], trainer.frozen, batch).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        sums.append([float(x) for x in trainer.eval_fn(trainer.state["params"], trainer.frozen, batch)])
    assert temps[1] < 0.5 * temps[0], temps
    np.testing.assert_allclose(sums[1], sums[0], rtol=1e-6)


def test_7b_config_resolves_with_paper_settings_and_shardings():
    """configs/pretrain/cancerllm_7b.yaml as in the paper, and its shardings on a 10x1 mesh, without compiling."""
    cfg = resolve(PretrainConfig, os.path.join(ROOT, "configs/pretrain/cancerllm_7b.yaml"), ["model=mistral-7b-v0.1"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, len(cfg.lora.targets)) == (8, 16.0, 0.05, 7)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.schedule) == (
        2e-4, 0.05, 0.01, "linear")
    assert (cfg.data.block_size, cfg.batch_size, cfg.dtype, cfg.remat, cfg.mesh) == (3000, 40, "bfloat16", "full",
                                                                                     "10x1")
    assert cfg.data.tokenizer == "mistral-v1"
    trainer = Trainer(cfg, "/nonexistent/never-written", "pretrain", None, dry_run=True)
    assert trainer.model_cfg.num_params() > 7e9 and jax.device_count() == 10
    params = trainer.state["params"]["layers"]
    assert params["q"]["lora_a"].shape == (32, 4096, 8) and params["down"]["lora_b"].shape == (32, 8, 4096)
    assert str(params["q"]["lora_a"].dtype) == "float32" and str(trainer.frozen["embed"].dtype) == "bfloat16"
    assert trainer.batch_sh.spec == jax.sharding.PartitionSpec("data", None)
    lines = trainer.sharding_lines()
    assert len(lines) == 14 + 12  # 7 x (A, B); embed, lm_head, final_norm, 2 norms, 7 kernels
    assert not os.path.exists("/nonexistent/never-written")


@pytest.mark.skipif(os.environ.get("CANCERLLM_SLOW") != "1", reason="compiles the 7B step (~20 s CPU, about a "
                    "minute on a loaded 2-core host); set CANCERLLM_SLOW=1")
def test_7b_dry_run_compiles_with_a_memory_estimate(tmp_path, capsys):
    code = _launcher_module().main(["--config", os.path.join(ROOT, "configs/pretrain/cancerllm_7b.yaml"),
                                    "model=mistral-7b-v0.1", "--dry-run", "--workdir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert code == 0 and "7241.7M params" in out and "memory estimate per device (compiled step):" in out


def test_describe_warns_of_positions_past_the_model_and_of_memory_past_the_device(tmp_path, monkeypatch):
    """Sequences longer than the model's max_position_embeddings, and a compiled step estimated larger than the
    device's memory, are said before the run starts (both were silent, the second until the host ran out)."""
    import dataclasses

    trainer = make_trainer(tmp_path, "1x1")
    quiet = trainer.describe(32)
    assert "warning" not in quiet
    trainer.model_cfg = dataclasses.replace(trainer.model_cfg, max_position_embeddings=16)
    monkeypatch.setattr("cancerllm_jax.sharding.device_memory_bytes", lambda mesh: 1024)
    text = trainer.describe(32)
    assert "warning: sequences of 32 tokens go past the model's max_position_embeddings (16)" in text
    assert "more than the device's 0.00 GiB: the run may run out of memory" in text


def test_a_dry_run_of_the_7b_config_as_shipped_validates_the_preset_of_its_folders_name(capsys):
    """configs/pretrain/cancerllm_7b.yaml names a placeholder folder (/models/Mistral-7B-v0.1): a dry run without
    it validates the preset of that name (it was an error asking for model=mistral-7b-v0.1); another missing path
    stays an error."""
    from types import SimpleNamespace

    from cancerllm_jax.config import PRESETS
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.train.loop import dry_base

    import yaml

    with open(os.path.join(ROOT, "configs", "pretrain", "cancerllm_7b.yaml"), encoding="utf-8") as f:
        shipped = yaml.safe_load(f)["model"]
    assert not os.path.exists(shipped)
    assert dry_base(SimpleNamespace(model=shipped))[0] == PRESETS["mistral-7b-v0.1"]
    assert "validating with the preset of its name, mistral-7b-v0.1" in capsys.readouterr().err
    with pytest.raises(UserError, match="neither a preset"):
        dry_base(SimpleNamespace(model="/models/my-own-model"))
