"""The task runner (`launch/evaluate.py run` / `report`): prediction files, metrics.json, report.md, plots, resuming
an interrupted run without decoding finished instances again, re-scoring without a model, and clear errors on bad
prediction files. A tiny random Mistral (vocabulary 32000, the Mistral v1 SentencePiece tokenizer) decodes a few
tokens on two synthetic tasks, so the scores are ~0: only the plumbing is under test."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = "phenotype,diagnosis"
METRIC_KEYS = {"em_p", "em_r", "em_f1", "bleu2_p", "bleu2_r", "bleu2_f1", "rougeL_p", "rougeL_r", "rougeL_f1",
               "avg_f1", "n"}


def _evaluate():
    spec = importlib.util.spec_from_file_location("launch_evaluate", ROOT / "launch" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_mistral(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                                     max_position_embeddings=4096, initializer_range=0.2)
    transformers.MistralForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)


def _run_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--model", str(model), "--name", "vanilla", "--name", "tuned",
            "--tasks", TASKS, "--limit", "2", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out),
            *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-model, two-task run (the expensive part, done once)."""
    base = tmp_path_factory.mktemp("eval")
    model = base / "tiny"
    _tiny_mistral(model)
    out = base / "out"
    assert _evaluate().main(_run_args(model, out)) == 0
    return model, out


def test_outputs(finished):
    _, out = finished
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("protocol", "decoding", "versions", "seeds", "models", "tasks", "results", "device", "data"):
        assert key in metrics, key
    assert metrics["decoding"]["greedy"] and metrics["protocol"] == "standard"
    for pkg in ("jax", "flax", "transformers", "cancerllm_jax"):
        assert pkg in metrics["versions"]
    assert set(metrics["results"]) == {"phenotype", "diagnosis"}
    assert metrics["tasks"]["diagnosis"]["max_input_tokens"] == 1500  # the paper's limit
    assert metrics["tasks"]["diagnosis"]["max_new_tokens"] == 4  # the override
    for task, by_model in metrics["results"].items():
        assert set(by_model) == {"vanilla", "tuned"}
        for r in by_model.values():
            assert METRIC_KEYS <= set(r) and r["n"] == 2
            e = r["efficiency"]
            assert e["instances_decoded"] == 2 and e["generation_time_s"] > 0 and e["generated_tokens"] > 0
            assert e["tokens_per_s"] > 0 and e["peak_memory_bytes"] > 0
        rows = _rows(out / "predictions" / f"vanilla__{task}.jsonl")
        assert len(rows) == 2 and all(set(r) == {"id", "prompt_hash", "gold", "prediction"} for r in rows)
        # in the test split's order (decoded longest prompt first), so its lines pair with the test file's
        assert [r["id"] for r in rows] == metrics["tasks"][task]["ids"]
        assert all(len(r["prompt_hash"]) == 16 for r in rows)
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Setup", "## Cancer phenotype extraction (Table 2-shaped)",
                    "## Cancer diagnosis generation (Table 3-shaped)", "## Efficiency (Table 7-shaped)",
                    "| Model | n | Exact Match P", "Tokens/s", "Peak memory (MiB)", "jax ", "greedy"):
        assert section in report, section
    for png in ("scores_avg_f1.png", "scores_by_metric.png", "efficiency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report


def test_resume_decodes_only_missing(finished, tmp_path, monkeypatch):
    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    pred = out / "predictions" / "vanilla__phenotype.jsonl"
    rows = _rows(pred)
    # keep one finished row, then a torn half-written line, as after an interrupt
    pred.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:25])
    for name in ("tuned__phenotype", "tuned__diagnosis"):  # another model's task never started
        (out / "predictions" / f"{name}.jsonl").unlink()
    from cancerllm_jax.decode import Decoder

    calls = []
    real = Decoder.generate

    def spy(self, prompts, *a, **k):
        calls.append(len(prompts))
        return real(self, prompts, *a, **k)

    monkeypatch.setattr(Decoder, "generate", spy)
    assert _evaluate().main(_run_args(model, out)) == 0
    assert calls == [1, 2, 2]  # vanilla: 1 phenotype row; tuned: both tasks; vanilla diagnosis: nothing
    new = _rows(pred)
    assert new[0] == rows[0] and sorted(r["id"] for r in new) == sorted(r["id"] for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    r = metrics["results"]["phenotype"]["vanilla"]
    assert (r["resumed"], r["decoded"], r["n"]) == (1, 1, 2)
    assert metrics["results"]["diagnosis"]["vanilla"]["decoded"] == 0
    # timing covers both sessions' batches of the instance set
    assert r["efficiency"]["instances_decoded"] == 3 and r["efficiency"]["sessions"] == 2


def test_rescore_without_decoding(finished, tmp_path, monkeypatch, capsys):
    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    import cancerllm_jax

    def no_model(*a, **k):
        raise AssertionError("re-scoring must not load a model")

    monkeypatch.setattr(cancerllm_jax, "load", no_model)
    before = json.loads((out / "metrics.json").read_text())
    pred = out / "predictions" / "tuned__diagnosis.jsonl"
    rows = _rows(pred)
    rows[0]["prediction"] = rows[0]["gold"]  # a perfect answer for one of two instances
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _evaluate().main(["report", "--out", str(out), "--protocol", "reference"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert after["protocol"] == "reference" and "rescored" in after
    assert after["results"]["diagnosis"]["tuned"]["em_f1"] == pytest.approx(50.0)
    assert after["results"]["phenotype"]["vanilla"]["efficiency"] == before["results"]["phenotype"]["vanilla"][
        "efficiency"]
    assert "`reference`" in (out / "report.md").read_text()
    # one file on its own, through `score`
    assert _evaluate().main(["score", "--pred", str(pred)]) == 0
    assert "instances: 2" in capsys.readouterr().out


def test_runs_of_one_task_at_a_time_build_one_report(finished, tmp_path, capsys, monkeypatch):
    """A run into a folder keeps what an earlier run there scored and it does not redo (scored again from the
    files), unless that result's file is gone, its model name or task settings now mean something else, or the
    earlier run had other decoding settings (the report states them once); a run cut short keeps them too."""
    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "predictions" / "tuned__phenotype.jsonl").unlink()
    args = ["run", "--model", str(model), "--name", "other", "--tasks", "diagnosis", "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out)]
    assert _evaluate().main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {t: set(by) for t, by in metrics["results"].items()} == {
        "diagnosis": {"other", "vanilla", "tuned"}, "phenotype": {"vanilla"}}
    assert "tuned__phenotype" not in json.dumps(metrics) and "phenotype / tuned" in capsys.readouterr().err
    assert metrics["results"]["phenotype"]["vanilla"] == {
        **json.loads((done / "metrics.json").read_text())["results"]["phenotype"]["vanilla"]}
    assert set(metrics["models"]) == {"other", "vanilla", "tuned"} and "phenotype / vanilla" in metrics["notes"][0]
    report = (out / "report.md").read_text()
    assert "## Cancer phenotype extraction" in report and "| other |" in report
    # the sparse table re-scores, and a task run again with other settings drops the earlier models' results on it
    assert _evaluate().main(["report", "--out", str(out)]) == 0
    assert _evaluate().main([*args[:-4], "--max-new-tokens", "3", "--out", str(out), "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {t: set(by) for t, by in metrics["results"].items()} == {"diagnosis": {"other"}, "phenotype": {"vanilla"}}
    # an --overwrite run cut short after discarding: metrics.json still holds the results a later run keeps
    from cancerllm_jax.eval import runner

    def cut(*a, **k):
        raise KeyboardInterrupt

    again = [*args[:-4], "--max-new-tokens", "2", "--out", str(out), "--overwrite"]
    with monkeypatch.context() as m:
        m.setattr(runner, "decode_task", cut)
        with pytest.raises(SystemExit, match="130"):  # as a Ctrl-C ends it
            _evaluate().main(again)
    assert set(json.loads((out / "metrics.json").read_text())["results"]) == {"phenotype"}
    assert not (out / "report.md").exists()
    assert _evaluate().main(again) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {t: set(by) for t, by in metrics["results"].items()} == {"diagnosis": {"other"}, "phenotype": {"vanilla"}}
    # other decoding settings (the batch size the report states): nothing earlier is kept
    capsys.readouterr()
    assert _evaluate().main([*again[:again.index("--batch-size")], "--batch-size", "1", *again[
        again.index("--batch-size") + 2:-1]]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["results"]) == {"diagnosis"}
    assert "phenotype / vanilla) are not kept: it had other decoding" in capsys.readouterr().err


def test_an_earlier_result_on_test_records_changed_since_is_not_kept(finished, tmp_path, capsys):
    """The same --data path with other test records (an edited gold answer): the earlier results on that task are
    not kept beside this run's (they were scored against the old answers); those on unchanged tasks are."""
    model, _ = finished
    data, out = tmp_path / "data", tmp_path / "out"
    for task, n in (("phenotype", 2), ("diagnosis", 2)):
        (data / task).mkdir(parents=True)
        (data / task / "test.jsonl").write_text("".join(json.dumps(
            {"id": f"{task}{i}", "context": f"note {i}: er+ breast idc", "response": f"answer {i}"}) + "\n"
            for i in range(n)))
    common = ["--batch-size", "2", "--max-new-tokens", "3", "--data", str(data), "--out", str(out)]
    assert _evaluate().main(["run", "--model", str(model), "--name", "a", "--tasks", "phenotype,diagnosis",
                             *common]) == 0
    rows = [json.loads(line) for line in (data / "phenotype" / "test.jsonl").read_text().splitlines()]
    rows[0]["response"] = "another answer"
    (data / "phenotype" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert _evaluate().main(["run", "--model", str(model), "--name", "b", "--tasks", "diagnosis", *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {t: set(by) for t, by in metrics["results"].items()} == {"diagnosis": {"a", "b"}}
    err = capsys.readouterr().err
    assert "test records changed" in err and err.split("test records changed")[1].count("phenotype / a") == 1
    assert metrics["notes"][0].endswith(": diagnosis / a")


@pytest.mark.parametrize("damage, message", [
    ("non_json", "not valid JSON"),
    ("missing_id", "missing ids"),
    ("extra_row", "is not in this run's test split"),
    ("missing_field", "missing field(s) prediction"),
    ("duplicate", "duplicate id"),
])
def test_bad_prediction_files(finished, tmp_path, damage, message):
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.runner import rescore

    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    pred = out / "predictions" / "vanilla__diagnosis.jsonl"
    rows = _rows(pred)
    lines = [json.dumps(r) for r in rows]
    if damage == "non_json":
        lines.insert(1, "{this is not json")
    elif damage == "missing_id":
        lines = lines[:1]
    elif damage == "extra_row":
        lines.append(json.dumps({**rows[0], "id": "some-other-id"}))
    elif damage == "missing_field":
        del rows[1]["prediction"]
        lines[1] = json.dumps(rows[1])
    elif damage == "duplicate":
        lines.append(lines[0])
    pred.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        rescore(str(out))
    assert "vanilla__diagnosis.jsonl" in str(err.value)


def test_resume_refuses_changed_prompts(finished, tmp_path, monkeypatch):
    from cancerllm_jax.errors import UserError

    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    pred = out / "predictions" / "vanilla__phenotype.jsonl"
    rows = _rows(pred)
    rows[0]["prompt_hash"] = "0" * 16
    pred.write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")  # raise the UserError instead of printing it and exiting
    with pytest.raises(UserError, match="prompt_hash"):
        _evaluate().main(_run_args(model, out))


def test_an_edited_split_updates_golds_and_overwrite_decodes_changed_prompts_again(finished, tmp_path, monkeypatch):
    """A corrected gold label keeps its prediction (same prompt) with the new gold; a changed prompt is refused,
    and with --overwrite only that row is decoded again (it was refused either way: the whole file re-decoded)."""
    from cancerllm_jax.decode import Decoder
    from cancerllm_jax.errors import UserError

    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    pred = out / "predictions" / "vanilla__phenotype.jsonl"
    rows = _rows(pred)
    calls = []
    real = Decoder.generate
    monkeypatch.setattr(Decoder, "generate", lambda self, prompts, *a, **k: calls.append(len(prompts))
                        or real(self, prompts, *a, **k))
    pred.write_text("".join(json.dumps(r) + "\n" for r in [dict(rows[0], gold="an old label"), rows[1]]))
    assert _evaluate().main(_run_args(model, out)) == 0
    assert calls == [] and _rows(pred) == rows
    pred.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], dict(rows[1], prompt_hash="0" * 16)]))
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")  # raise the UserError instead of printing it and exiting
    with pytest.raises(UserError, match="plus --overwrite to decode such rows again"):
        _evaluate().main(_run_args(model, out))
    assert _evaluate().main(_run_args(model, out, "--overwrite")) == 0
    assert calls == [1] and sorted(_rows(pred), key=lambda r: r["id"]) == sorted(rows, key=lambda r: r["id"])


def test_a_second_run_on_the_same_out_is_refused(finished, tmp_path, monkeypatch):
    """Two runs on one --out appended the same rows twice (a duplicate-id error on every later run)."""
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.train.run_io import FolderLock

    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")
    with FolderLock(str(out), "--out"):  # another process's run, as far as flock is concerned
        with pytest.raises(UserError, match=r"--out .* is in use by another command \(process \d+"):
            _evaluate().main(_run_args(model, out))
    assert _evaluate().main(_run_args(model, out)) == 0  # released


def test_resume_refuses_other_model_or_settings(finished, tmp_path, monkeypatch):
    """Predictions made by other weights (even with the same folder name) or other decoding settings are never
    resumed: one error names what differs, before any model is loaded; --overwrite decodes them again."""
    from cancerllm_jax.errors import UserError

    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    other = tmp_path / "elsewhere" / model.name  # other weights, the same basename
    shutil.copytree(model, other)
    os.utime(other / "model.safetensors", ns=(1, 1))
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")
    args = ["run", "--model", str(other), "--model", str(model), "--name", "vanilla", "--name", "tuned",
            "--tasks", TASKS, "--limit", "2", "--batch-size", "2", "--out", str(out)]
    with pytest.raises(UserError) as err:
        _evaluate().main([*args, "--max-new-tokens", "8", "--temperature", "0.9"])
    msg = str(err.value)
    assert "vanilla__phenotype.jsonl" in msg and "--overwrite" in msg and "fresh --out" in msg
    for what in ("model_path", "weights", "max_new_tokens 4 (now 8)", "temperature 0.0 (now 0.9)"):
        assert what in msg, what
    with pytest.raises(UserError, match=r"vanilla__phenotype.jsonl: .*temperature 0.0 \(now 0.9\)") as err:
        _evaluate().main(_run_args(model, out, "--temperature", "0.9"))
    assert "model_path" not in str(err.value) and "max_new_tokens" not in str(err.value)
    with pytest.raises(UserError, match="max_input_tokens 1500 \\(now 64\\)"):
        _evaluate().main(_run_args(model, out, "--max-input-tokens", "64"))
    os.remove(out / "predictions" / "vanilla__diagnosis.produced_by.json")  # as an older version left it
    with pytest.raises(UserError, match="no record of the model and settings"):
        _evaluate().main(_run_args(model, out))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((done / "metrics.json").read_text())

    assert _evaluate().main([*args, "--max-new-tokens", "4", "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("phenotype", "diagnosis"):
        r = metrics["results"][task]["vanilla"]
        assert (r["resumed"], r["decoded"]) == (0, 2)  # other weights: decoded again
        assert r["produced_by"]["model_path"] == str(other) and r["efficiency"]["instances_decoded"] == 2
        assert metrics["results"][task]["tuned"]["resumed"] == 2  # same weights and settings: kept
    assert metrics["models"]["vanilla"]["weights"] != metrics["models"]["tuned"]["weights"]


def test_model_fingerprint_follows_the_weights(tmp_path):
    from cancerllm_jax.eval.runner import model_fingerprint

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x" * 10)
    first = model_fingerprint(str(hf))
    (hf / "notes.md").write_text("unrelated")  # not a weight, config or tokenizer file
    assert model_fingerprint(str(hf)) == first and first["path"] == str(hf.resolve())
    (hf / "model.safetensors").write_bytes(b"y" * 11)
    assert model_fingerprint(str(hf))["weights"] != first["weights"]
    run = tmp_path / "run"  # a training run folder, trained further
    (run / "checkpoints" / "10" / "state").mkdir(parents=True)
    (run / "checkpoints" / "10" / "state" / "a").write_text("1")
    (run / "run.json").write_text(json.dumps({"format": "cancerllm-jax/run-v1", "base": {"kind": "path",
                                                                                         "path": str(hf)}}))
    before = model_fingerprint(str(run))
    (run / "metrics.jsonl").write_text("{}\n")  # logs do not count
    assert model_fingerprint(str(run)) == before and before["checkpoint_step"] == 10
    (run / "checkpoints" / "20" / "state").mkdir(parents=True)
    after = model_fingerprint(str(run))
    assert after["checkpoint_step"] == 20 and after["weights"] != before["weights"]
    # the run reads its base from the base's folder at every load: other base weights are other weights
    assert after["base"] == model_fingerprint(str(hf))
    (hf / "model.safetensors").write_bytes(b"z" * 12)
    assert model_fingerprint(str(run))["base"]["weights"] != after["base"]["weights"]


def test_prediction_errors_never_quote_text(finished, tmp_path):
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.runner import read_predictions, rescore

    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    pred = out / "predictions" / "vanilla__diagnosis.jsonl"
    rows = _rows(pred)
    good = pred.read_bytes()
    pred.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "prediction": ["Patient Jane Roe"]}) + "\n")
    with pytest.raises(UserError, match=r"vanilla__diagnosis.jsonl:2: field 'prediction' must be a string, got array"
                       ) as err:
        rescore(str(out))
    assert "Jane" not in str(err.value)
    pred.write_bytes(good.replace(b'"prediction"', b'"prediction\xff"', 1))  # a byte that is not UTF-8, line 1
    with pytest.raises(UserError, match=r"vanilla__diagnosis.jsonl:1: not valid UTF-8"):
        rescore(str(out))
    # a write cut inside a multi-byte character is a torn last line: dropped when resuming, kept rows intact
    pred.write_bytes(good + json.dumps({**rows[0], "id": "z", "prediction": "é"}, ensure_ascii=False
                                       ).encode()[:-3])
    with pytest.raises(UserError, match=r"vanilla__diagnosis.jsonl:3: not valid UTF-8"):
        read_predictions(str(pred))
    assert [r["id"] for r in read_predictions(str(pred), allow_torn_tail=True)] == [r["id"] for r in rows]
    assert pred.read_bytes() == good
    for damaged, message in ((b'{"models": {}, "tasks":', r"metrics.json:1: not valid JSON"),
                             (b'{"models": "\xff"}', r"metrics.json:1: not valid UTF-8"),
                             (b'[1, 2]', r"metrics.json: not a metrics.json written by")):
        (out / "metrics.json").write_bytes(damaged)
        with pytest.raises(UserError, match=message) as err:
            rescore(str(out))
        assert "evaluate.py run` again" in str(err.value)


def test_argument_errors_leave_no_output_folder(finished, tmp_path):
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.runner import Decoding, RunConfig, model_names, run
    from cancerllm_jax.eval.tasks import parse_tasks

    model, _ = finished
    one_file = tmp_path / "diagnosis.jsonl"
    one_file.write_text(json.dumps({"context": "note", "response": "lung cancer"}) + "\n")
    out = tmp_path / "out"

    def cfg(**kw):
        base = {"models": model_names([str(model)]), "tasks": parse_tasks(TASKS), "out": str(out), "limit": 1,
                "decoding": Decoding(batch_size=1)}
        return RunConfig(**{**base, **kw})

    with pytest.raises(UserError, match=r"diagnosis.jsonl is one file, but 2 tasks were given \(phenotype, diagnosis"):
        run(cfg(data=str(one_file)))
    import transformers

    no_tokenizer = tmp_path / "small-vocab"  # not the Mistral vocabulary: load() has no tokenizer to fall back on
    transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(no_tokenizer, safe_serialization=True)
    for bad, message in (({"limit": 0}, "--limit must be at least 1"), ({"data": str(tmp_path / "nope")}, "nope"),
                         ({"models": model_names([str(tmp_path / "no-model")])}, "model path not found"),
                         ({"tokenizer": str(tmp_path / "no-tokenizer")}, "tokenizer not found: .*no-tokenizer"),
                         ({"models": model_names([str(no_tokenizer)])}, "small-vocab: no tokenizer found"),
                         ({"models": model_names([str(no_tokenizer)]), "tokenizer": "mistral-v1"},
                          "has 32000 tokens but the model's vocabulary is 64"),
                         # these left OUT/predictions/*.produced_by.json naming the bad value
                         ({"dtype": "fp33"}, "dtype 'fp33' is not supported"), ({"mesh": "2y1"}, "mesh '2y1'")):
        with pytest.raises(UserError, match=message):
            run(cfg(**bad))
    assert not out.exists()


def test_task_specs_and_user_jsonl(tmp_path):
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.tasks import TASKS, parse_tasks, read_test_split

    limits = {t: (s.max_input_tokens, s.max_new_tokens) for t, s in TASKS.items()}
    assert limits["phenotype"] == (1500, 50) and limits["diagnosis"] == (1500, 500)
    assert limits["treatment_plan"] == (4000, 500)
    assert [s.name for s in parse_tasks("all")] == ["phenotype", "diagnosis", "treatment_plan"]
    with pytest.raises(UserError, match="unknown task"):
        parse_tasks("diagnosys")
    (tmp_path / "diagnosis").mkdir()
    (tmp_path / "diagnosis" / "test.jsonl").write_text(
        json.dumps({"id": 7, "instruction": "Dx?", "context": "note", "response": "lung cancer"}) + "\n"
        + json.dumps({"context": "note 2", "response": "breast cancer"}) + "\n")
    recs = read_test_split("diagnosis", str(tmp_path))
    assert [r["id"] for r in recs] == ["7", "line2"] and recs[1]["instruction"].startswith("You are a medical")
    (tmp_path / "bad.jsonl").write_text('{"response": "x"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        read_test_split("diagnosis", str(tmp_path / "bad.jsonl"))
    (tmp_path / "alpaca.jsonl").write_text('{"response": "x", "context": "c"}\n{"response": "x", "input": "c"}\n')
    with pytest.raises(UserError, match=r"alpaca.jsonl:2: field 'input' is not read; rename it to 'context'"):
        read_test_split("diagnosis", str(tmp_path / "alpaca.jsonl"))  # its context is not silently left out
    assert len(read_test_split("diagnosis", "synthetic", limit=3)) == 3


def test_cli_errors():
    from cancerllm_jax.errors import UserError

    ev = _evaluate()
    with pytest.raises(UserError, match="--max-new-tokens"):
        ev.parse_limits("diagnosis=abc", ["diagnosis"], "--max-new-tokens")
    for text in ("diagnosis=64,8", "8, diagnosis =64"):  # a task's own limit wins over N, in either order
        assert ev.parse_limits(text, ["diagnosis", "phenotype"], "--max-new-tokens") == {
            "diagnosis": 64, "phenotype": 8}
    for text in ("diagnosis=3,diagnosis=7", "3,7"):
        with pytest.raises(UserError, match="given twice"):
            ev.parse_limits(text, ["diagnosis", "phenotype"], "--max-new-tokens")
    with pytest.raises(UserError, match="rescore needs"):
        from cancerllm_jax.eval.runner import rescore

        rescore(os.devnull + "-nothing-here")
    from cancerllm_jax.eval.scan import parse_temperatures

    assert parse_temperatures("0.5, 1") == [0.5, 1.0] and parse_temperatures(None)[0] == 0.1
    for bad in ("0,1", "0.1,abc", "1e-7,0.5", "0.1234561,0.1234564", "0.3,0.30000000000000004", "nan", "", " ,"):
        with pytest.raises(UserError, match="--temperatures"):  # 1e-7 was greedy (rounded to 0) in folder T0
            parse_temperatures(bad)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_k_shot_prompts_hold_training_exemplars_and_fit_the_budget():
    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.eval.tasks import build_few_shot_prompt, build_prompt, get_task, read_test_split, \
        read_train_split

    tok = load_tokenizer(None)
    spec = get_task("phenotype")
    record = read_test_split("phenotype", "synthetic:20:0", limit=1)[0]
    train = read_train_split("phenotype", "synthetic:20:0")
    three = build_few_shot_prompt(tok, record, spec, train, 3, seed=0)
    zero = build_prompt(tok, record, spec)
    assert three.text.count("### Response:") == 4 and three.text.endswith(zero.text)
    assert record["context"] not in three.text[: -len(zero.text)]  # the example itself is never an exemplar
    assert three.hash != zero.hash and len(three.ids) <= spec.max_input_tokens and three.shots == 3
    tight = build_few_shot_prompt(tok, record, spec.with_limits(max_input_tokens=len(zero.ids) + 5), train, 3)
    assert tight.text == zero.text and tight.shots == 0  # no exemplar fits: zero-shot, and it says so


def test_adapters_per_model_and_in_the_provenance(finished, tmp_path, monkeypatch):
    """``--adapter`` pairs a PEFT adapter with each ``--model`` (``none``: the bare model); the adapter's weights
    are part of what made the predictions, so a run with another adapter is not resumed from them."""
    import peft
    import torch
    import transformers

    from cancerllm_jax.errors import UserError

    model, _ = finished
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")
    adapter = tmp_path / "tuned-adapter"
    pmodel = peft.get_peft_model(transformers.MistralForCausalLM.from_pretrained(model),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    pmodel.save_pretrained(adapter)
    out = tmp_path / "out"
    args = ["run", "--model", str(model), "--adapter", "none", "--model", str(model), "--adapter", str(adapter),
            "--tasks", "phenotype", "--limit", "1", "--batch-size", "1", "--max-new-tokens", "3", "--out", str(out)]
    assert _evaluate().main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {model.name, "tuned-adapter"}  # the adapter names its model by default
    assert metrics["models"]["tuned-adapter"]["adapter"]["path"] == str(adapter.resolve())
    assert "adapter" not in metrics["models"][model.name]
    setup = (out / "report.md").read_text()  # the report says what ran: the adapter too
    assert f"`tuned-adapter`: `{model}` + adapter `{adapter.resolve()}`" in setup
    assert f"`{model.name}`: `{model}`," in setup
    made = json.loads((out / "predictions" / "tuned-adapter__phenotype.produced_by.json").read_text())
    assert made["adapter"]["weights"]
    # the same adapter folder with other weights: refused, naming the adapter
    (adapter / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    os.utime(adapter / "adapter_model.safetensors", ns=(1, 1))
    with pytest.raises(UserError, match=r"tuned-adapter__phenotype.jsonl: .*adapter"):
        _evaluate().main(args)
    other = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=32000, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "wrong")
    for bad, message in ((["--adapter", str(adapter)], "2 --model but 1 --adapter"),
                         (["--adapter", "none", "--adapter", str(tmp_path / "nope")], "nope: not found"),
                         # found before the first model decodes, not when the second one loads
                         (["--adapter", "none", "--adapter", str(tmp_path / "wrong")], "another base model")):
        fresh = tmp_path / "fresh"
        argv = ["run", "--model", str(model), "--model", str(model), *bad, "--tasks", "phenotype", "--limit", "1",
                "--out", str(fresh)]
        with pytest.raises(UserError, match=message):
            _evaluate().main(argv)
        assert not fresh.exists()


def test_a_record_with_a_null_key_still_resumes(finished, tmp_path, monkeypatch):
    """A key null in the record and absent now (or the reverse) is no difference: such a run resumes."""
    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")
    meta = out / "predictions" / "vanilla__phenotype.produced_by.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "adapter": None}))
    older = out / "predictions" / "tuned__phenotype.produced_by.json"  # written before tokenizers were hashed
    older.write_text(json.dumps({k: v for k, v in json.loads(older.read_text()).items() if k != "tokenizer_sha256"}))
    assert _evaluate().main(_run_args(model, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"]["phenotype"]["vanilla"]["resumed"] == 2
    assert metrics["results"]["phenotype"]["tuned"]["resumed"] == 2


def test_resume_refuses_another_tokenizer_at_the_same_path(finished, tmp_path, monkeypatch):
    """Prompt hashes are of the prompt text: a tokenizer that splits it otherwise is seen by the content hash of
    the tokenizer's files in the record, not by its path (the same --tokenizer path with another file in it)."""
    from cancerllm_jax.data.tokenizer import mistral_v1_model_file
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.runner import tokenizer_sha256

    model, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    monkeypatch.setenv("CANCERLLM_DEBUG", "1")
    tok = tmp_path / "tok" / "tokenizer.model"
    tok.parent.mkdir()
    shutil.copyfile(mistral_v1_model_file(), tok)
    made = json.loads((out / "predictions" / "vanilla__phenotype.produced_by.json").read_text())
    assert made["tokenizer_sha256"] == tokenizer_sha256(None) == tokenizer_sha256(str(tok))  # the default one
    assert tokenizer_sha256(str(tok.parent)) and tokenizer_sha256(str(tmp_path / "nothing")) is None
    for meta in (out / "predictions").glob("*.produced_by.json"):  # as a run with --tokenizer tok made them
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "tokenizer": str(tok)}))
    assert _evaluate().main(_run_args(model, out, "--tokenizer", str(tok))) == 0
    assert json.loads((out / "metrics.json").read_text())["results"]["diagnosis"]["tuned"]["decoded"] == 0
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.read_bytes())
    proto.pieces[1000].score += 1.0  # another (valid) tokenizer file at the same path
    tok.write_bytes(proto.SerializeToString())
    with pytest.raises(UserError, match=r"__\w+\.jsonl: .*tokenizer_sha256 '[0-9a-f]{64}' \(now '[0-9a-f]{64}'\)"):
        _evaluate().main(_run_args(model, out, "--tokenizer", str(tok)))


def test_radonc_icd10_metrics_and_confusion_plot(finished, tmp_path):
    """The ICD-10 task's own metrics reach metrics.json with both confusion matrices, and the report shows the
    chapter matrix as a table and the paper-group one as a PNG; a code written without its dot counts as the
    gold's category on re-scoring."""
    model, _ = finished
    out = tmp_path / "out"
    assert _evaluate().main(["run", "--model", str(model), "--tasks", "radonc_icd10", "--limit", "2",
                             "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    pred = out / "predictions" / "tiny__radonc_icd10.jsonl"
    rows = _rows(pred)
    rows[0]["prediction"] = rows[0]["gold"].replace(".", "")
    rows[1]["prediction"] = "not sure"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _evaluate().main(["report", "--out", str(out)]) == 0
    extra = json.loads((out / "metrics.json").read_text())["results"]["radonc_icd10"]["tiny"]["radonc"]
    assert extra["accuracy"] == pytest.approx(0.5) and extra["unparsed_predictions"] == 1
    assert len(extra["chapter_confusion"]) == len(extra["chapters"]) and extra["group_confusion"]
    report = (out / "report.md").read_text()
    assert "](icd10_groups_tiny.png)" in report and "group_confusion" not in report
    assert "Confusion by ICD-10 chapter, tiny" in report and "other" in extra["chapters"]  # the unparsed answer
    for label, row in zip(extra["chapters"], extra["chapter_confusion"], strict=True):
        assert f"| {label} | " + " | ".join(map(str, row)) + " |" in report
    assert sum(map(sum, extra["chapter_confusion"])) == 2
    assert (out / "icd10_groups_tiny.png").read_bytes()[:4] == b"\x89PNG"
    # trust checks the task's own scores against the predictions too (it compared only EM / BLEU / ROUGE)
    from cancerllm_jax.errors import UserError

    metrics = json.loads((out / "metrics.json").read_text())
    metrics["results"]["radonc_icd10"]["tiny"]["radonc"]["accuracy"] = 0.9
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError, match=r"radonc_icd10 / tiny radonc accuracy is 0.9000 in metrics.json, 0.5000 from"):
        _evaluate().main.__wrapped__(["trust", "--run", f"a={out}"])


def test_temperature_scan_runs_each_temperature_and_tests_the_first_model(finished, tmp_path, capsys):
    """``evaluate.py scan``: a resumable run per temperature, the paper's scan scores (accuracy for the RT modality,
    Average F1 for phenotypes), highest / median, and one-sided Wilcoxon tests per task and overall."""
    model, _ = finished
    out = tmp_path / "scan"
    args = ["scan", "--model", str(model), "--name", "a", "--model", str(model), "--name", "b",
            "--tasks", "radonc_modality,phenotype", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3",
            "--temperatures", "0.5,1", "--out", str(out)]
    assert _evaluate().main(args) == 0
    scan = json.loads((out / "scan.json").read_text())
    assert scan["temperatures"] == [0.5, 1.0] and scan["models"] == ["a", "b"]
    for t in ("T0.5", "T1"):
        metrics = json.loads((out / t / "metrics.json").read_text())
        assert metrics["decoding"]["temperature"] == float(t[1:]) and not metrics["decoding"]["greedy"]
        assert scan["scores"]["phenotype"]["a"]["scores"][scan["temperatures"].index(float(t[1:]))] == \
            metrics["results"]["phenotype"]["a"]["avg_f1"]
        assert scan["scores"]["radonc_modality"]["b"]["scores"][scan["temperatures"].index(float(t[1:]))] == \
            metrics["results"]["radonc_modality"]["b"]["radonc"]["accuracy"]
    tests = scan["wilcoxon"]["a > b"]
    assert set(tests) == {"radonc_modality", "phenotype", "overall"} and tests["overall"]["n"] == 4
    # the same model twice with the same seed: identical samples, so A > B is never significant
    assert all(r["p_value"] == 1.0 and not r["significant"] for r in tests.values())
    report = (out / "scan.md").read_text()
    assert "| a > b | overall |" in report and "](scan.png)" in report
    assert (out / "scan.png").read_bytes()[:4] == b"\x89PNG"
    # run again: every temperature resumes, nothing is decoded again
    before = {p: p.stat().st_mtime_ns for p in out.glob("T*/predictions/*.jsonl")}
    assert _evaluate().main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("T*/predictions/*.jsonl")} == before
    with pytest.raises(SystemExit):
        _evaluate().main(args[:-4] + ["--temperatures", "0,1", "--out", str(out)])


def test_trust_metrics_over_run_folders(finished, tmp_path, capsys, caplog):
    """``evaluate.py trust``: seed 004's metrics of each model over runs on several datasets, from metrics.json
    (refused when its prediction files were changed since)."""
    from cancerllm_jax.errors import UserError
    from cancerllm_jax.eval.trust import entry_from_score, trust_metrics

    _, done = finished
    other = tmp_path / "other"
    shutil.copytree(done, other)
    preds = other / "predictions" / "tuned__diagnosis.jsonl"
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    edited = [{**r, "prediction": r["gold"]} for r in rows]  # a second dataset that differs: all right
    preds.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(UserError, match="prediction files disagree: diagnosis / tuned em_p is 0.0000 in metrics.json, "
                                        r"100.0000 from the predictions \(the files, or the scorer, changed since the "
                                        r"run\); re-score with `evaluate.py report"):
        _evaluate().main.__wrapped__(["trust", "--run", f"a={done}", "--run", f"b={other}"])
    cut = tmp_path / "cut"  # a file that lost a row is refused too (it was only a warning)
    shutil.copytree(other, cut)
    pred = cut / "predictions" / "vanilla__phenotype.jsonl"
    pred.write_text(pred.read_text().splitlines(keepends=True)[0])
    with pytest.raises(UserError, match=f"--run {cut}: its prediction files no longer match the run"):
        _evaluate().main.__wrapped__(["trust", "--run", f"a={done}", "--run", f"b={cut}"])
    assert _evaluate().main(["report", "--out", str(other)]) == 0
    assert _evaluate().main(["trust", "--run", f"a={done}", "--run", f"b={other}", "--json",
                             str(tmp_path / "t.json")]) == 0
    got = json.loads((tmp_path / "t.json").read_text())
    assert "--run a and b hold the same diagnosis test data" in caplog.text  # a copy: no second dataset
    assert got["datasets"] == ["a", "b"] and set(got["models"]) == {"vanilla", "tuned"}
    runs = [json.loads((d / "metrics.json").read_text())["results"] for d in (done, other)]
    want = trust_metrics({task: {name: entry_from_score(r[task]["tuned"]) for name, r in zip("ab", runs)}
                          for task in runs[0]})
    for key in ("faithfulness", "comprehensiveness", "generalizability", "robustness"):
        assert got["models"]["tuned"][key] == pytest.approx(want[key]), key
    assert got["models"]["tuned"]["robustness"] > 0 and "faithfulness" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _evaluate().main(["trust", "--run", str(tmp_path / "nothing")])


def test_shots_and_prompt_cuts_are_checked_and_reported(finished, tmp_path):
    """Too few training exemplars for --shots, or none, is an error before OUT exists; contexts cut to fit the
    prompt budget and the shots used are reported."""
    model, _ = finished
    data = tmp_path / "data"
    for task in ("phenotype", "diagnosis"):
        (data / task).mkdir(parents=True)
        (data / task / "test.jsonl").write_text(json.dumps({"context": "pt w/ nsclc " * 40, "response": "x"}) + "\n")
    (data / "phenotype" / "train.jsonl").write_text(json.dumps({"context": "c", "response": "y"}) + "\n")
    out = tmp_path / "out"
    base = ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "2"]
    for tasks, shots, needle in [("phenotype", "3", "only 1 record"), ("phenotype,diagnosis", "1", "diagnosis")]:
        with pytest.raises(SystemExit):
            _evaluate().main(base + ["--tasks", tasks, "--shots", shots])
        assert not out.exists(), needle
    assert _evaluate().main(base + ["--tasks", "phenotype", "--shots", "1", "--max-input-tokens", "150"]) == 0
    eff = json.loads((out / "metrics.json").read_text())["results"]["phenotype"]["tiny"]["efficiency"]
    assert eff["prompts_cut"] == 1 and eff["context_tokens_cut"] > 0 and eff["prompts_with_fewer_shots"] == 1
    report = (out / "report.md").read_text()
    assert "1-shot prompts" in report and "Contexts cut to fit the prompt budget (instances): tiny: 1" in report


def test_sampled_predictions_do_not_depend_on_a_resume(finished, tmp_path):
    """Each test instance samples from a seed of its own (the run's seed and its id): a run resumed for its last
    instance gives what the uninterrupted run gave."""
    model, _ = finished
    rows = {}
    for name, limits in (("whole", ["3"]), ("resumed", ["2", "3"])):
        out = tmp_path / name
        for limit in limits:
            assert _evaluate().main(["run", "--model", str(model), "--tasks", "phenotype", "--limit", limit,
                                     "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "5", "--batch-size",
                                     "1", "--out", str(out)]) == 0
        rows[name] = {r["id"]: r["prediction"] for r in _rows(out / "predictions" / "tiny__phenotype.jsonl")}
    assert rows["whole"] == rows["resumed"] and len(rows["whole"]) == 3


def test_resume_after_a_cut_just_before_the_newline(tmp_path):
    """A complete last row without its newline (the interrupt fell between the two) is kept, and the rows appended
    on resuming start on a line of their own."""
    from cancerllm_jax.eval.runner import _append_jsonl, read_predictions

    path = tmp_path / "p.jsonl"
    row = {"id": "0", "prompt_hash": "h", "gold": "g", "prediction": "p"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "1"}))
    assert [r["id"] for r in read_predictions(str(path), allow_torn_tail=True)] == ["0", "1"]
    _append_jsonl(str(path), [{**row, "id": "2"}])
    _append_jsonl(str(path), [{**row, "id": "3"}])
    assert [r["id"] for r in read_predictions(str(path))] == ["0", "1", "2", "3"]


def test_a_failed_report_or_plot_leaves_no_stale_or_partial_file(finished, tmp_path, monkeypatch):
    """report.md never describes other metrics than metrics.json's, and a PNG cut by an error is not left behind."""
    import matplotlib.figure

    from cancerllm_jax.eval import report, runner

    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    old_png = (out / "efficiency.png").read_bytes()

    def torn_savefig(self, path, **kw):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n cut")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_savefig)
    with pytest.raises(KeyboardInterrupt):
        runner.rescore(str(out), "reference")
    assert json.loads((out / "metrics.json").read_text())["protocol"] == "reference"
    assert not (out / "report.md").exists()  # the old one described the `standard` scores
    assert (out / "efficiency.png").read_bytes() == old_png and (out / "scores_avg_f1.png").stat().st_size > 5000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    report.write_report(str(out), runner.rescore(str(out), write=False))
    assert (out / "report.md").is_file()


def _reproduce():
    if str(ROOT / "launch") not in sys.path:
        sys.path.insert(0, str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("launch_reproduce", ROOT / "launch" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_resumes_training_stages_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    """The training stages are started with --resume (an interrupted run continues; a fresh one starts at step 0),
    and a folder made with another model, scale, data or pretraining choice is refused, not mixed."""
    rep = _reproduce()
    monkeypatch.setattr(rep, "check_model", lambda m: None)  # the model folders here are empty stand-ins
    model, other, out = tmp_path / "model", tmp_path / "other", tmp_path / "out"
    model.mkdir()
    other.mkdir()
    cmds = []

    def fake_run(cmd, *args, **kw):  # run_child: the exit code
        cmds.append(cmd)
        if "--workdir" in cmd:
            os.makedirs(cmd[cmd.index("--workdir") + 1], exist_ok=True)
        return 0

    monkeypatch.setattr(rep, "run_child", fake_run)
    argv = ["--scale", "cpu-small", "--model", str(model), "--out", str(out), "--skip", "robustness"]
    assert rep.main(argv) == 0
    stages = {os.path.basename(c[1]): c for c in cmds}
    assert "--resume" in stages["pretrain.py"] and "--resume" in stages["finetune.py"]
    # the model folder has no tokenizer: the trainers use the default one, as cancerllm_jax.load does
    assert not [a for a in stages["pretrain.py"] + stages["finetune.py"] if a.startswith("data.tokenizer=")]
    state = json.loads((out / "reproduce.json").read_text())
    for changed in (["--model", str(other)], ["--skip", "pretrain,robustness"]):
        args = argv + changed
        with pytest.raises(SystemExit) as e:
            rep.main(args)
        assert e.value.code != 0 and "was made with other settings" in capsys.readouterr().err
    assert json.loads((out / "reproduce.json").read_text()) == state  # nothing recorded by the refused runs
    # a setting is recorded once a stage that depends on it is finished: a run that failed in pretraining can be
    # started again with other pretraining data
    out2, fail = tmp_path / "out2", []
    monkeypatch.setattr(rep, "run_child", lambda cmd, *a, **kw: fake_run(cmd) if not fail else 1)
    fail.append(1)
    with pytest.raises(SystemExit):
        rep.main([*argv[:-4], "--out", str(out2), "--pretrain-data", str(tmp_path / "typo.jsonl")])
    assert "stage pretrain failed" in capsys.readouterr().err
    fail.clear()
    assert rep.main([*argv[:-4], "--out", str(out2), "--pretrain-data", str(tmp_path / "notes.jsonl")]) == 0
    # a relative --pretrain-data is read from the caller's folder (the subprocess runs in the checkout)
    monkeypatch.chdir(tmp_path)
    cmds.clear()
    assert rep.main([*argv[:-4], "--out", str(tmp_path / "out4"), "--pretrain-data", "notes.jsonl"]) == 0
    pretrain = next(c for c in cmds if os.path.basename(c[1]) == "pretrain.py")
    assert pretrain[pretrain.index("--data") + 1] == str(tmp_path / "notes.jsonl"), pretrain
    with pytest.raises(SystemExit):  # a wrong --data is refused before OUT is made (and before it records anything)
        rep.main([*argv[:-4], "--out", str(tmp_path / "out3"), "--data", str(tmp_path / "nodata")])
    assert "phenotype/train.jsonl is missing" in capsys.readouterr().err and not (tmp_path / "out3").exists()
    (out / "reproduce.json").write_text('{"stages": {')
    with pytest.raises(SystemExit) as e:
        rep.main(argv)
    assert e.value.code != 0 and "reproduce.json:1: not valid JSON" in capsys.readouterr().err


def test_reproduce_7b_fine_tunes_with_the_papers_settings():
    """The 7B scale's fine-tuning runs (the tuned model and the counterfactual ones) take the paper's stage 2: max
    sequence 4000 (they took the CPU-sized default of 512 and cut every long context), resolved as finetune.py does."""
    from cancerllm_jax.train.config import resolve
    from cancerllm_jax.train.finetune import FinetuneConfig

    scale = _reproduce().SCALES["7b"]
    for args in (scale.finetune, scale.counterfactual):
        overrides = [a for a in args if "=" in a]
        cfg = resolve(FinetuneConfig, None, overrides, {"epochs": float(args[args.index("--epochs") + 1])})
        assert (cfg.data.max_seq_len, cfg.epochs, cfg.lora.rank, cfg.optim.clip_norm) == (4000, 5.0, 64, 0.3)


def test_efficiency_rows_say_when_timings_do_not_cover_the_split():
    from cancerllm_jax.eval.report import efficiency_table
    from cancerllm_jax.eval.runner import summarize_stats

    batch = {"n": 2, "time_s": 4.0, "prompt_tokens": 10, "generated_tokens": 8}
    metrics = {"tasks": {"diagnosis": {"max_input_tokens": 1500, "max_new_tokens": 4}}, "results": {"diagnosis": {
        "all": {"n": 2, "efficiency": summarize_stats([batch])},
        "lost": {"n": 2, "efficiency": summarize_stats([])},  # the stats file is gone
        "part": {"n": 3, "efficiency": summarize_stats([batch])}}}}
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.split("|")[4:8]] for r in efficiency_table(metrics)[2:]}
    assert rows == {"all": ["2", "0:00:04", "8", "2.0"], "lost": ["2 (0 timed)", "–", "0", "–"],
                    "part": ["3 (2 timed)", "0:00:04", "8", "2.0"]}


def test_damaged_timing_lines_lose_only_their_timing(tmp_path, capsys):
    from cancerllm_jax.eval.runner import read_stats, summarize_stats

    path = tmp_path / "m__diagnosis.stats.jsonl"
    good = {"n": 2, "time_s": 1.5, "prompt_tokens": 3, "generated_tokens": 6}
    path.write_bytes(b"\n".join([json.dumps(good).encode(), b"[1]", b'{"n": 2}', b'{"n": "\xff"}',
                                 json.dumps({**good, "n": True}).encode(), b'{"n": 2, "ti']))
    e = summarize_stats(read_stats(str(path)))
    assert (e["instances_decoded"], e["generation_time_s"], e["tokens_per_s"]) == (2, 1.5, 4.0)
    assert capsys.readouterr().err.count("unreadable timing line skipped") == 5


def test_reproduce_stages_are_keyed_to_their_inputs(tmp_path, monkeypatch, capsys):
    """A fine-tuning run trained again makes the finished evaluation stale: it is redone (with --overwrite, so
    the runner keeps the vanilla predictions that still match), never reused; a finished training run whose inputs
    changed (the pretraining redone under it) is refused until its folder is deleted."""
    rep = _reproduce()
    monkeypatch.setattr(rep, "check_model", lambda m: None)  # the model folders here are empty stand-ins
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    ran, trained = [], [0]

    def fake_run(cmd, *args, **kw):  # run_child: the exit code
        ran.append(os.path.basename(cmd[1]))
        if "--workdir" in cmd:  # a training run: new weights every time
            work = Path(cmd[cmd.index("--workdir") + 1])
            work.mkdir(parents=True, exist_ok=True)
            trained[0] += 1
            (work / "adapter_model.safetensors").write_bytes(b"w" * trained[0])
        if "--out" in cmd:
            Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True, exist_ok=True)
            (Path(cmd[cmd.index("--out") + 1]) / "report.md").write_text("# r\n")
            (Path(cmd[cmd.index("--out") + 1]) / "table6.md").write_text("TABLE 6\n")
        return 0

    monkeypatch.setattr(rep, "run_child", fake_run)
    argv = ["--scale", "cpu-small", "--model", str(model), "--out", str(out), "--skip", "robustness"]
    assert rep.main(argv) == 0 and ran == ["pretrain.py", "finetune.py", "evaluate.py"]
    assert ("This run: continued pretraining, then instruction tuning on 64 examples (40 phenotype, 12 diagnosis, "
            "12 treatment plan)") in (out / "report.md").read_text()  # counted, as trained (it was a fixed text)
    ran.clear()
    assert rep.main(argv) == 0 and ran == []  # nothing changed: nothing runs
    shutil.rmtree(out / "finetune")  # fine-tuning done again: the evaluation of the old adapter is stale
    assert rep.main(argv) == 0 and ran == ["finetune.py", "evaluate.py"]
    state = json.loads((out / "reproduce.json").read_text())
    assert "--overwrite" in state["stages"]["evaluate"]["command"] and state["stages"]["evaluate"]["finished"]
    ran.clear()
    shutil.rmtree(out / "pretrain")  # pretraining done again under a finished fine-tuning run: refused
    with pytest.raises(SystemExit) as e:
        rep.main(argv)
    err = capsys.readouterr().err
    assert e.value.code != 0 and "finetune: " in err and "Delete " in err and "model0" in err
    assert ran == ["pretrain.py"]
    shutil.rmtree(out / "finetune")
    assert rep.main(argv) == 0 and ran == ["pretrain.py", "finetune.py", "evaluate.py"]
    ran.clear()
    (out / "data" / "diagnosis" / "test.jsonl").write_text("{}\n")  # other test data: evaluated again
    assert rep.main(argv) == 0 and ran == ["evaluate.py"]
    ran.clear()
    assert rep.main(argv[:-2]) == 0 and ran == ["robustness.py", "robustness.py"]  # misspell, counterfactual
    assert "TABLE 6" in (out / "report.md").read_text()
    ran.clear()
    shutil.rmtree(out / "finetune")  # Table 6 of the old adapter is not reported beside the new one's results
    assert rep.main(argv) == 0 and ran == ["finetune.py", "evaluate.py"]
    assert "TABLE 6" not in (out / "report.md").read_text()


def test_model_names_make_no_hidden_files():
    """``--name ..`` or ``.x`` wrote predictions/..__task.jsonl, hidden from ``ls``."""
    from cancerllm_jax.eval.runner import model_names

    assert [m.name for m in model_names(["a", "b", "c"], ["..", ".x", "v1.2"])] == ["model0", "x", "v1.2"]


def test_host_peak_memory_is_each_tasks_own():
    """The host's peak RSS starts afresh per task (and per noise rate): a small task decoded after a big one read
    the big one's peak (``ru_maxrss`` is the process's high-water mark)."""
    import mmap

    from cancerllm_jax.eval.runner import peak_memory, reset_peak_memory

    if peak_memory()[1] != "host peak RSS (VmHWM)":
        pytest.skip("no /proc/self/status VmHWM here")
    big = mmap.mmap(-1, 256 * 2**20)  # 256 MiB, touched, then unmapped (malloc would keep it: hostmem.py)
    big.write(b"x" * len(big))
    high, _ = peak_memory()
    big.close()
    reset_peak_memory()
    after, kind = peak_memory()
    assert kind == "host peak RSS (VmHWM)" and after < high - 128 * 2**20, (high, after)


def test_reproduce_runs_both_robustness_sweeps_at_every_scale():
    """Issue 5: reproduce.py runs "the robustness sweeps" (cpu-small left the counterfactual one, Table 5, out). Each
    scale's sweep arguments parse as robustness.py parses them and resolve as finetune.py resolves its overrides."""
    import importlib.util

    from cancerllm_jax.train.config import resolve
    from cancerllm_jax.train.finetune import FinetuneConfig

    spec = importlib.util.spec_from_file_location("launch_robustness_cf", ROOT / "launch" / "robustness.py")
    rob = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rob)
    for name, scale in _reproduce().SCALES.items():
        assert scale.counterfactual is not None and scale.misspell is not None, name
        args = rob.build_parser().parse_args(["counterfactual", "--model", "m", "--out", "o", *scale.counterfactual])
        assert args.rates == [0.2, 0.4, 0.6, 0.8], name
        resolve(FinetuneConfig, None, args.overrides, {"epochs": args.epochs}).validate()
