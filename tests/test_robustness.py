"""The sweep plumbing without a model: a fake trainer and decoder, then the tables, JSON and PNG."""
import json
import re
from pathlib import Path

import pytest

from cancerllm_jax.eval import robustness as rb
from cancerllm_jax.eval.noise import round_half_up


def _recs(task, n):
    return [{"id": f"{task}-{i}", "task": task, "instruction": "Answer.", "context": f"the left breast mass {i} cm",
             "sentence": f"the left breast mass {i} cm", "entity_type": "tumor_laterality", "response": "left"}
            for i in range(n)]


def test_counterfactual_sweep_with_fake_trainer(tmp_path, monkeypatch):
    calls = []

    def fake_trainer(cmd, log_path):
        calls.append(cmd)
        train = [json.loads(x) for x in Path(cmd[cmd.index("--data") + 1]).read_text().splitlines()]
        wrong = sum(r["response"] != "left" for r in train)
        (log_path.parent / "wrong.txt").write_text(str(wrong))
        log_path.write_text("ok")

    def fake_decode(lm, records, task, settings):  # a model that is right on 1 - rate of the examples
        rate = float(lm)
        k = round_half_up((1 - rate) * len(records))
        return ["left"] * k + ["right"] * (len(records) - k), {"seconds": 0.0}, ["h"] * len(records)

    def fake_load(path, dtype):  # the "model" is the share of wrong training labels it saw
        return int((Path(path).parent / "wrong.txt").read_text()) / 10

    monkeypatch.setattr(rb, "load_model", fake_load)
    monkeypatch.setattr(rb, "decode", fake_decode)
    res = rb.counterfactual_sweep("base", _recs("phenotype", 10), _recs("phenotype", 2), _recs("phenotype", 4),
                                  tmp_path / "cf", rates=[0.2, 0.8], settings=rb.DecodeSettings(),
                                  trainer=fake_trainer, log=lambda s: None)
    assert [c[c.index("--epochs") + 1] for c in calls] == ["1", "1"]
    assert [r["n_corrupted"] for r in res.rows] == [2, 8]
    assert [r["avg_f1"] for r in res.rows] == [75.0, 25.0]  # 3 of 4 then 1 of 4 right
    assert res.mean_avg_f1["phenotype"] == 50.0
    # a second run with the same settings reuses the finished rates: no training
    calls.clear()
    rb.counterfactual_sweep("base", _recs("phenotype", 10), _recs("phenotype", 2), _recs("phenotype", 4),
                            tmp_path / "cf", rates=[0.2, 0.8], log=lambda s: None)
    assert calls == []
    paths = rb.write_outputs(tmp_path / "out", res, "fake")
    table = Path(paths["table"]).read_text()
    assert "Table 5" in table and "| 20% |" in table and "**50.00**" in table
    assert json.loads(Path(paths["json"]).read_text())["counterfactual"]["mean_avg_f1"] == {"phenotype": 50.0}
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"
    # user data without a validation split: fine-tuning without --eval-data (it was refused: val.jsonl not found)
    calls.clear()
    rb.counterfactual_sweep("base", _recs("phenotype", 10), [], _recs("phenotype", 4), tmp_path / "cf-noval",
                            rates=[0.2], settings=rb.DecodeSettings(), trainer=fake_trainer, log=lambda s: None)
    assert len(calls) == 1 and "--eval-data" not in calls[0] and not (tmp_path / "cf-noval" / "counterfactual"
                                                                         / "val.jsonl").exists()
    (tmp_path / "data" / "phenotype").mkdir(parents=True)
    assert rb.load_split(str(tmp_path / "data"), "phenotype", "val", required=False) == []


def test_misspelling_sweep_and_clean_reference(tmp_path, monkeypatch):
    seen = {}

    def fake_decode(lm, records, task, settings):
        seen[(task, records[0]["noise"]["rate"])] = records[0]["context"]
        preds = [r["response"] if r["noise"]["words"] == 0 else "x" for r in records]
        return preds, {"seconds": 0.0}, ["h"] * len(records)

    monkeypatch.setattr(rb, "decode", fake_decode)
    tests = {"diagnosis": _recs("diagnosis", 3), "treatment_plan": _recs("treatment_plan", 3)}
    res = rb.misspelling_sweep(object(), tests, tmp_path, rates=[0.0, 0.5], log=lambda s: None)
    assert [(r["task"], r["rate"], r["avg_f1"]) for r in res.rows] == [
        ("diagnosis", 0.0, 100.0), ("diagnosis", 0.5, 0.0), ("treatment_plan", 0.0, 100.0),
        ("treatment_plan", 0.5, 0.0)]
    assert res.mean_avg_f1 == {"diagnosis": 0.0, "treatment_plan": 0.0}  # rate 0 is not in the mean
    assert seen[("diagnosis", 0.0)] == "the left breast mass 0 cm" != seen[("diagnosis", 0.5)]
    paths = rb.write_outputs(tmp_path, res, "fake")
    table = Path(paths["table"]).read_text()
    assert "0% (clean)" in table
    # EVAL_PROTOCOL §7: time, tokens/s and memory per rate (absent figures as a dash)
    assert "| Task | rate | Generation time (s) | Tokens/s | Peak memory (MiB) |" in table
    assert "| treatment plan | 50% | 0.00 | – | – |" in table
    Path(paths["json"]).write_text('{"misspell": ')  # damaged: one clear error, not a JSONDecodeError
    from cancerllm_jax.errors import UserError

    with pytest.raises(UserError, match=r"robustness.json:1: not valid JSON .*run the sweeps again"):
        rb.write_outputs(tmp_path, res, "fake")


def test_load_split_reads_user_jsonl_with_clear_errors(tmp_path):
    from cancerllm_jax.errors import UserError

    folder = tmp_path / "phenotype"
    folder.mkdir()
    good = {"instruction": "List the phenotypes.", "context": "pt w/ nsclc", "response": "lung cancer", "id": 7}
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(UserError, match=r"test\.jsonl:2: .*response"):
        rb.load_split(str(tmp_path), "phenotype", "test")
    (folder / "test.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(UserError, match=r"test\.jsonl:2: not valid UTF-8"):
        rb.load_split(str(tmp_path), "phenotype", "test")
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "context": None}) + "\n")
    with pytest.raises(UserError, match=r"test\.jsonl:3: duplicate id '7'"):  # read as evaluate.py reads them
        rb.load_split(str(tmp_path), "phenotype", "test")
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({"context": "nsclc",
                                                                                "response": "lung cancer"}) + "\n")
    records = rb.load_split(str(tmp_path), "phenotype", "test")
    assert [r["response"] for r in records] == ["lung cancer"] * 2 and records[1]["instruction"]  # the default
    # a line with no instruction and no context asked the model the default instruction alone; generate.py's
    # 'prompt' and other names (note, question) were dropped silently
    for blank in ("", " \n"):  # an empty or blank instruction is the task's default, as a missing one
        (folder / "test.jsonl").write_text(json.dumps({"instruction": blank, "context": "c", "response": "x"}) + "\n")
        assert rb.load_split(str(tmp_path), "phenotype", "test")[0]["instruction"] == records[1]["instruction"]
    for line, words in (({"response": "x"}, "neither 'instruction' nor 'context'"),
                        ({"note": "pt w/ nsclc", "question": "dx?", "response": "x"}, "this line has note, question"),
                        ({"prompt": "List ...", "response": "x"}, "field 'prompt' is not read here"),
                        ({"instruction": " ", "response": "x"}, "neither 'instruction' nor 'context'")):
        (folder / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(UserError, match=re.escape(words)):
            rb.load_split(str(tmp_path), "phenotype", "test")


def test_load_split_reads_data_as_evaluate_does(tmp_path):
    """synthetic:PATIENTS[:SEED], DIR/<task>.jsonl and one JSONL file, as evaluate.py run reads --data."""
    from cancerllm_jax.data.synthetic import instruction_datasets
    from cancerllm_jax.errors import UserError

    assert rb.load_split("synthetic:12", "diagnosis", "test", seed=3) == instruction_datasets(12, seed=3)[
        "diagnosis"]["test"]  # --seed when the spec names no seed
    assert rb.load_split("synthetic:12:5", "diagnosis", "train", seed=3) == instruction_datasets(12, seed=5)[
        "diagnosis"]["train"]
    with pytest.raises(UserError, match="PATIENTS >= 10"):
        rb.load_split("synthetic:4", "diagnosis", "test")
    good = {"instruction": "Diagnose.", "context": "pt w/ nsclc", "response": "lung cancer"}
    (tmp_path / "diagnosis.jsonl").write_text(json.dumps(good) + "\n")
    assert rb.load_split(str(tmp_path), "diagnosis", "test")[0]["response"] == "lung cancer"
    assert rb.load_split(str(tmp_path / "diagnosis.jsonl"), "diagnosis", "test")[0]["id"] == "line1"
    with pytest.raises(UserError, match=r"train\.jsonl not found \(--data .* is not a folder"):
        rb.load_split(str(tmp_path / "diagnosis.jsonl"), "phenotype", "train")


def test_cli_misspell_refuses_one_file_for_several_tasks(tmp_path):
    from cancerllm_jax.errors import UserError

    mod = _launch_robustness()
    model = _fake_model(tmp_path / "m")
    (tmp_path / "t.jsonl").write_text(json.dumps({"context": "c", "response": "r"}) + "\n")
    with pytest.raises(UserError, match="is one file, but 2 tasks were given"):
        mod.main.__wrapped__(["misspell", "--model", model, "--data", str(tmp_path / "t.jsonl"), "--out",
                              str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_rates_that_differ_never_share_a_folder(tmp_path):
    assert rb.rate_dir(tmp_path, 0.2).name == "rate_20" and rb.rate_dir(tmp_path, 0.02).name == "rate_02"
    assert rb.rate_dir(tmp_path, 0.204).name == "rate_20.4" and rb.rate_dir(tmp_path, 0.3).name == "rate_30"


# ------------------------------------------------------------------ cached rates are keyed on their settings


def _launch_robustness():
    """launch/robustness.py as a module (its ``main.__wrapped__`` raises instead of exiting)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "launch"))
    spec = importlib.util.spec_from_file_location("launch_robustness", root / "launch" / "robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_model(folder: Path, payload: bytes = b"w") -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(payload)
    return str(folder)


def test_misspelling_cache_is_keyed_on_model_data_and_settings(tmp_path, monkeypatch):
    from cancerllm_jax.errors import UserError

    decoded = []

    def fake_decode(lm, records, task, settings):
        decoded.append((lm, len(records)))
        return [r["response"] for r in records], {"seconds": 0.0}, ["h"] * len(records)

    monkeypatch.setattr(rb, "decode", fake_decode)
    monkeypatch.setattr(rb, "load_model", lambda path, dtype, adapter=None: path)
    a, b = _fake_model(tmp_path / "a" / "m"), _fake_model(tmp_path / "b" / "m", b"other weights")
    out = tmp_path / "O"

    def sweep(model, n=1, overwrite=False, adapter=None, **settings):
        return rb.misspelling_sweep(model, {"diagnosis": _recs("diagnosis", n)}, out, rates=[0.2],
                                    settings=rb.DecodeSettings(**settings), log=lambda s: None, overwrite=overwrite,
                                    adapter=adapter)

    assert [r["n"] for r in sweep(a).rows] == [1]
    assert [r["n"] for r in sweep(a).rows] == [1] and len(decoded) == 1  # the same settings: reused
    adapter = tmp_path / "adapter"  # an adapter on the model is part of the settings
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"factors")
    with pytest.raises(UserError, match="model_adapter"):
        sweep(a, adapter=str(adapter))
    for kwargs, needles in (({"n": 3}, ["n_test 1 (now 3)", "test_set"]),
                            ({"max_new_tokens": 2}, ["max_new_tokens 500 (now 2)"]),
                            ({"model": b}, ["model_path", "model_weights"])):
        with pytest.raises(UserError) as err:
            sweep(kwargs.pop("model", a), **kwargs)
        for needle in [*needles, "rate_20/scores.json", "--overwrite"]:
            assert needle in str(err.value), needle
    assert len(decoded) == 1
    res = sweep(b, n=3, overwrite=True)
    assert [r["n"] for r in res.rows] == [3] and decoded[-1] == (b, 3) and res.settings["model"] == b
    assert [r["n"] for r in sweep(b, n=3).rows] == [3] and len(decoded) == 2
    Path(a, "model.safetensors").write_bytes(b"trained further")  # the same folder, other weights
    with pytest.raises(UserError, match="model_weights"):
        sweep(a, n=3)
    # a damaged scores.json (an older version wrote it in place) is recomputed, with a warning
    scores = out / "misspell" / "diagnosis" / "rate_20" / "scores.json"
    scores.write_text('{"avg_f1": 1')
    logs = []
    rb.misspelling_sweep(b, {"diagnosis": _recs("diagnosis", 3)}, out, rates=[0.2], log=logs.append)
    assert len(decoded) == 3 and any("scores.json:1: not valid JSON" in m and "recomputing" in m for m in logs)
    assert json.loads(scores.read_text())["settings"]["n_test"] == 3


def test_misspelling_cache_follows_a_run_base_and_the_tokenizer(tmp_path, monkeypatch):
    """A training run reads its base at every load and its tokenizer from a file: a retrained base or another
    tokenizer at the same path is another model; a record from before these keys were kept still resumes."""
    from cancerllm_jax.errors import UserError

    monkeypatch.setattr(rb, "decode", lambda lm, recs, task, s: ([r["response"] for r in recs], {"seconds": 0.0},
                                                                  ["h"] * len(recs)))
    monkeypatch.setattr(rb, "load_model", lambda path, dtype, adapter=None: path)
    base = _fake_model(tmp_path / "base")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"pieces")
    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": "cancerllm-jax/run-v1", "tokenizer": str(tok),
                                              "base": {"kind": "path", "path": str(base)}}))
    out = tmp_path / "O"

    def sweep():
        return rb.misspelling_sweep(str(run), {"diagnosis": _recs("diagnosis", 1)}, out, rates=[0.2],
                                    log=lambda s: None)

    sweep()
    scores = out / "misspell" / "diagnosis" / "rate_20" / "scores.json"
    key = json.loads(scores.read_text())["settings"]
    assert key["model_base"]["weights"] and len(key["model_tokenizer_sha256"]) == 64
    Path(base, "model.safetensors").write_bytes(b"retrained base")
    with pytest.raises(UserError, match="model_base"):
        sweep()
    Path(base, "model.safetensors").write_bytes(b"w")
    data = json.loads(scores.read_text())  # as an older version wrote it: neither key
    old = {k: v for k, v in data["settings"].items() if k not in ("model_base", "model_tokenizer_sha256")}
    scores.write_text(json.dumps({**data, "settings": old}))
    sweep()
    tok.write_bytes(b"other pieces")
    scores.write_text(json.dumps(data))
    with pytest.raises(UserError, match="model_tokenizer_sha256"):
        sweep()


def test_counterfactual_cache_resume_and_atomic_writes(tmp_path, monkeypatch):
    from cancerllm_jax.errors import UserError

    calls, atomic = [], []

    def fake_trainer(cmd, log_path):
        calls.append(cmd)
        (Path(cmd[cmd.index("--workdir") + 1]) / "checkpoints").mkdir(parents=True, exist_ok=True)

    def fake_decode(lm, records, task, settings):
        return ["left"] * len(records), {"seconds": 0.0}, ["h"] * len(records)

    real_atomic = rb.write_text_atomic

    def spy_atomic(path, text):
        atomic.append(Path(path).name)
        real_atomic(path, text)

    monkeypatch.setattr(rb, "load_model", lambda path, dtype: path)
    monkeypatch.setattr(rb, "decode", fake_decode)
    monkeypatch.setattr(rb, "write_text_atomic", spy_atomic)
    base = _fake_model(tmp_path / "base")

    def sweep(epochs=1.0, overwrite=False, overrides=("lora.rank=4", "lora.alpha=8"), **settings):
        return rb.counterfactual_sweep(base, _recs("phenotype", 10), _recs("phenotype", 2), _recs("phenotype", 4),
                                       tmp_path / "cf", rates=[0.2], epochs=epochs, overrides=overrides,
                                       settings=rb.DecodeSettings(**settings), trainer=fake_trainer,
                                       log=lambda s: None, overwrite=overwrite)

    sweep()
    assert len(calls) == 1 and "--resume" not in calls[0]
    assert {"scores.json", "corrupted_ids.json", "settings.json"} <= set(atomic)
    d = tmp_path / "cf" / "counterfactual" / "rate_20"
    assert json.loads((d / "corrupted_ids.json").read_text()) and not list(d.glob("*.tmp*"))
    # interrupted after training started: scores.json missing, run/ there -> the run is resumed, not refused
    (d / "scores.json").unlink()
    sweep(overrides=("lora.alpha=8", "lora.rank=2", "lora.rank=4"))  # the same settings in another order
    assert len(calls) == 2 and "--resume" in calls[1]
    with pytest.raises(UserError, match=r"epochs 1.0 \(now 2.0\).*--overwrite"):
        sweep(epochs=2.0)
    with pytest.raises(UserError, match=r"max_new_tokens 50 \(now 3\)"):
        sweep(max_new_tokens=3)
    assert len(calls) == 2
    sweep(max_new_tokens=3, overwrite=True)  # only the decoding changed: the run is reused (resumed), re-scored
    assert len(calls) == 3 and "--resume" in calls[2]
    assert json.loads((d / "scores.json").read_text())["settings"]["max_new_tokens"] == 3
    (d / "scores.json").unlink()
    with pytest.raises(UserError, match=r"rate_20/run: a fine-tuning run made with other settings: epochs"):
        sweep(epochs=2.0)  # an unfinished run of other training settings is never continued
    sweep(epochs=2.0, overwrite=True)
    assert len(calls) == 4 and "--resume" not in calls[3] and calls[3][calls[3].index("--epochs") + 1] == "2"


def test_finetune_command_uses_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("models/base").mkdir(parents=True)
    cmd = rb.finetune_command("models/base", Path("rb/train.jsonl"), Path("rb/val.jsonl"), Path("rb/run"), 1.0,
                              ["lora.rank=4"], resume=True)
    for flag, rel in (("--model", "models/base"), ("--data", "rb/train.jsonl"), ("--eval-data", "rb/val.jsonl"),
                      ("--workdir", "rb/run")):
        assert cmd[cmd.index(flag) + 1] == str(tmp_path / rel), flag
    assert "--resume" in cmd and cmd[-1] == "lora.rank=4"
    assert rb.finetune_command("tiny", Path("t"), Path("v"), Path("w"), 1.0)[3] == "tiny"  # a preset stays
    # a steps= override sets the length: --epochs is not passed beside it (finetune.py refuses the pair)
    assert "--epochs" in cmd and "--epochs" not in rb.finetune_command("tiny", Path("t"), None, Path("w"), 1.0,
                                                                       ["steps=2"])


def test_counterfactual_with_relative_paths_resumes_an_interrupted_rate(tmp_path, monkeypatch):
    """The real fine-tuning subprocess, from a working folder other than the checkout, with a relative --model and
    --out (as the README's examples); then a rate interrupted after its first checkpoint resumes on a re-run."""
    import torch
    import transformers

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     sliding_window=64)
    transformers.MistralForCausalLM(cfg).save_pretrained("models/tiny", safe_serialization=True)
    settings = rb.DecodeSettings(max_new_tokens=2, max_prompt_tokens=64)

    def sweep():
        return rb.counterfactual_sweep("models/tiny", _recs("phenotype", 4), _recs("phenotype", 2),
                                       _recs("phenotype", 1), "rb", rates=[0.5], epochs=1.0, settings=settings,
                                       overrides=["steps=2", "save_every=1", "batch_size=2", "lora.rank=4",
                                                  "data.max_seq_len=64"], log=lambda s: None)

    first = sweep()
    d = tmp_path / "rb" / "counterfactual" / "rate_50"
    assert first.rows[0]["n"] == 1 and (d / "run" / "checkpoints" / "2").is_dir()
    # as if killed after step 1's checkpoint: no step-2 checkpoint, no scores
    import shutil

    shutil.rmtree(d / "run" / "checkpoints" / "2")
    (d / "scores.json").unlink()
    again = sweep()
    assert "resumed from step 1" in (d / "finetune.log").read_text()
    assert (d / "run" / "checkpoints" / "2").is_dir() and again.rows[0]["n"] == 1


@pytest.mark.parametrize("flag", ["--limit", "--train-limit", "--epochs"])
def test_cli_refuses_limits_that_would_drop_examples(tmp_path, flag):
    from cancerllm_jax.errors import UserError

    mod = _launch_robustness()
    command = "misspell" if flag == "--limit" else "counterfactual"
    for value in ("0", "-1"):
        with pytest.raises(UserError, match=f"{flag} must be positive"):
            mod.main.__wrapped__([command, "--model", "tiny", "--out", str(tmp_path / "o"), flag, value])
    assert not (tmp_path / "o").exists()


def test_cli_misspell_adapter_is_checked_first(tmp_path):
    from cancerllm_jax.errors import UserError

    mod = _launch_robustness()
    model = _fake_model(tmp_path / "m")
    with pytest.raises(UserError, match="nope: not found"):
        mod.main.__wrapped__(["misspell", "--model", model, "--adapter", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o"), "--limit", "1"])
    assert not (tmp_path / "o").exists()


def test_cli_misspell_adapter_none_is_the_bare_model(tmp_path, monkeypatch):
    from cancerllm_jax.eval import robustness as rb

    seen = {}

    def sweep(model, data, out, rates, seed, settings, overwrite=False, adapter="unset"):
        seen["adapter"] = adapter
        raise SystemExit(3)

    monkeypatch.setattr(rb, "misspelling_sweep", sweep)
    monkeypatch.setattr(rb, "load_split", lambda *a, **k: [])
    model = _fake_model(tmp_path / "m")
    for value in ("none", "None", ""):
        with pytest.raises(SystemExit):
            _launch_robustness().main.__wrapped__(["misspell", "--model", model, "--adapter", value, "--out",
                                                   str(tmp_path / "o"), "--limit", "1"])
        assert seen.pop("adapter") is None


def test_decode_hashes_the_prompt_evaluate_run_builds():
    """Robustness predictions carry ``evaluate.py run``'s ``prompt_hash`` for the same record and limits, including
    a record whose context is cut to fit."""
    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.eval.tasks import build_prompt, get_task

    class FakeLM:
        tokenizer = load_tokenizer(None)
        eos_ids = (tokenizer.eos_id,)

        def generate(self, prompts, max_new_tokens, max_prompt_tokens, batch_size):
            self.fed = prompts
            return [[] for _ in prompts]

    recs = _recs("diagnosis", 2)
    recs[1]["context"] = "tumor " * 400  # cut to the 64-token budget below
    lm, settings = FakeLM(), rb.DecodeSettings(max_prompt_tokens=64, max_new_tokens=4)
    preds, stats, hashes = rb.decode(lm, recs, "diagnosis", settings)
    spec = get_task("diagnosis").with_limits(64, 4)
    want = [build_prompt(lm.tokenizer, r, spec) for r in recs]
    assert hashes == [p.hash for p in want] and lm.fed == [p.ids for p in want]
    assert stats["prompts_cut"] == 1 and preds == ["", ""]
    assert stats["peak_memory_bytes"] > 0 and stats["memory_kind"] and "tokens_per_s" in stats  # EVAL_PROTOCOL §7


def test_a_table_is_written_last_and_never_outlives_a_failed_update(tmp_path, monkeypatch):
    """table5/6.md marks a finished sweep (reproduce.py skips a stage that has one): it is written after the JSON
    and the plot, and an older one is gone when either fails."""
    scores = {f"{m}_{x}": 50.0 for m in ("em", "bleu2", "rougeL") for x in ("p", "r", "f1")}
    res = rb.SweepResult("misspell", [{"task": "diagnosis", "rate": 0.5, "n": 1, "avg_f1": 50.0, **scores}],
                         {"diagnosis": 50.0}, {"seed": 0})
    paths = rb.write_outputs(tmp_path, res, "fake")
    assert Path(paths["table"]).is_file()

    def broken_plot(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "plot_sweeps", broken_plot)
    with pytest.raises(KeyboardInterrupt):
        rb.write_outputs(tmp_path, res, "fake")
    assert not Path(paths["table"]).exists()


def test_a_sweep_that_recomputes_takes_its_old_results_back_first(tmp_path, monkeypatch):
    """``--overwrite`` (or a damaged rate) recomputes: the sweep's old table and robustness.json entry are removed
    before the first rate is decoded, so an interrupted run leaves nothing that reads as its finished result; the
    other sweep's entry and plot stay; a sweep that reuses every rate takes nothing back."""
    scores = {f"{m}_{x}": 50.0 for m in ("em", "bleu2", "rougeL") for x in ("p", "r", "f1")}
    other = rb.SweepResult("counterfactual", [{"task": "phenotype", "rate": 0.5, "n": 1, "avg_f1": 50.0, **scores}],
                           {"phenotype": 50.0}, {"seed": 0})
    rb.write_outputs(tmp_path, other, "base")
    monkeypatch.setattr(rb, "load_model", lambda path, dtype, adapter=None: path)
    monkeypatch.setattr(rb, "decode", lambda lm, records, task, settings: (
        [r["response"] for r in records], {"seconds": 0.0}, ["h"] * len(records)))
    model = _fake_model(tmp_path / "m")

    def sweep(**kw):
        return rb.misspelling_sweep(model, {"diagnosis": _recs("diagnosis", 2)}, tmp_path, rates=[0.2],
                                    log=lambda s: None, **kw)

    rb.write_outputs(tmp_path, sweep(), "m")
    assert (tmp_path / "table6.md").is_file() and set(json.loads((tmp_path / "robustness.json").read_text())) == {
        "counterfactual", "misspell"}
    sweep()  # every rate reused: nothing taken back
    assert (tmp_path / "table6.md").is_file()

    def interrupted(*a, **k):
        assert not (tmp_path / "table6.md").exists() and (tmp_path / "table5.md").is_file()
        assert set(json.loads((tmp_path / "robustness.json").read_text())) == {"counterfactual"}
        assert (tmp_path / "robustness.png").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(overwrite=True, settings=rb.DecodeSettings(max_new_tokens=3))


def test_cli_refuses_a_rate_given_twice(tmp_path, capsys):
    mod = _launch_robustness()
    with pytest.raises(SystemExit) as e:
        mod.main.__wrapped__(["misspell", "--model", "tiny", "--out", str(tmp_path / "o"), "--rates", "0.2,0.4,0.2"])
    assert e.value.code == 2 and "given twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    args = mod.build_parser().parse_args(["--debug", "misspell", "--model", "tiny", "--out", "o"])  # as evaluate.py
    assert args.command == "misspell"


def test_a_clean_reference_alone_has_no_mean_and_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(rb, "decode", lambda lm, recs, task, s: (["left"] * len(recs), {}, ["h"] * len(recs)))
    res = rb.misspelling_sweep(object(), {"diagnosis": _recs("diagnosis", 2)}, tmp_path, rates=[0.0],
                               log=lambda s: None)
    assert res.mean_avg_f1 == {"diagnosis": None}
    paths = rb.write_outputs(tmp_path, res, "fake")

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    json.loads(Path(paths["json"]).read_text(), parse_constant=no_constants)
    table = Path(paths["table"]).read_text()
    assert "| **mean over rates** |" in table and "nan" not in table


def test_a_failed_finetuning_run_is_one_line_naming_its_error_and_log(tmp_path):
    import sys

    from cancerllm_jax.errors import UserError

    log = tmp_path / "finetune.log"
    log.write_text("error: an earlier attempt's\n")  # the log is appended to: only this run's lines count
    cmd = [sys.executable, "-c", "import sys; print('error: data.jsonl:3: no response'); print('bye'); sys.exit(2)"]
    with pytest.raises(UserError) as e:
        rb.run_finetune(cmd, log)
    assert str(e.value) == f"fine-tuning failed (exit 2: error: data.jsonl:3: no response) (full log: {log})"
    killed = [sys.executable, "-c", "import os, signal; print('step 40/100 loss 1.2', flush=True); "
                                    "os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(UserError) as e:
        rb.run_finetune(killed, log)
    assert str(e.value) == ("fine-tuning failed (killed by signal 9, no error line; last output: step 40/100 loss "
                            f"1.2) (full log: {log})")


def test_misspelling_refuses_test_records_without_a_context(tmp_path, monkeypatch):
    """Notes in 'instruction' (no 'context') were "misspelled" with 0 words at every rate and tabled as noisy; a
    set with none is refused, a set with some is warned about."""
    from cancerllm_jax.errors import UserError

    monkeypatch.setattr(rb, "decode", lambda lm, records, task, settings: (["x"] * len(records), {},
                                                                           ["h"] * len(records)))
    bare = [{k: v for k, v in r.items() if k != "context"} for r in _recs("diagnosis", 2)]
    with pytest.raises(UserError, match="none of the 2 test records has a 'context'"):
        rb.misspelling_sweep(object(), {"diagnosis": bare}, tmp_path, rates=[0.5], log=lambda s: None)
    assert not (tmp_path / "misspell").exists()
    logs = []
    rb.misspelling_sweep(object(), {"diagnosis": bare + _recs("diagnosis", 1)}, tmp_path, rates=[0.5],
                         log=logs.append)
    assert any("2 of 3 test records have no 'context'" in line for line in logs)


@pytest.mark.parametrize("override", ["model=other", "epochs=3", "steps=1", "data.path=x.jsonl", "task=diagnosis",
                                      "data={eval_path: x.jsonl}"])
def test_cli_counterfactual_refuses_overrides_of_what_the_sweep_sets(tmp_path, override):
    """model=, epochs=, steps= ... overrides trained something else than --model / --epochs, while the settings,
    the cache key and the table still said --model / --epochs (a changed model= was even reused as cached)."""
    from cancerllm_jax.errors import UserError

    key = "data.eval_path" if override.startswith("data=") else override.split("=")[0]
    with pytest.raises(UserError, match=f"the sweep sets {key} itself"):
        _launch_robustness().main.__wrapped__(["counterfactual", "--model", "tiny", "--out", str(tmp_path / "o"),
                                               override])
    assert not (tmp_path / "o").exists()


def test_cli_counterfactual_names_the_model_whatever_the_overrides(tmp_path, monkeypatch):
    """The override check's loop variable replaced the model's name: the table and JSON named the model after the
    last override's key (``dtype``)."""
    names = []
    monkeypatch.setattr(rb, "load_split", lambda *a, **k: [])
    monkeypatch.setattr(rb, "counterfactual_sweep", lambda *a, **k: "result")
    monkeypatch.setattr(rb, "write_outputs", lambda out, result, name: names.append(name) or {"table": __file__})
    _launch_robustness().main.__wrapped__(["counterfactual", "--model", "tiny", "--out", str(tmp_path / "o"),
                                           "lora.rank=4", "dtype=float32"])
    assert names == ["tiny"]


def test_cli_refuses_rates_that_would_share_a_folder(tmp_path):
    from cancerllm_jax.errors import UserError

    assert rb.rate_dir(tmp_path, 0.20000001).name == "rate_20.000001"
    with pytest.raises(UserError, match="too close to tell apart"):
        _launch_robustness().main.__wrapped__(["misspell", "--model", "m", "--out", str(tmp_path / "o"),
                                               "--rates", "0.2,0.2000000000001"])


def test_misspelling_reports_the_share_actually_misspelled(tmp_path, monkeypatch):
    """Rates round per text: on short texts 2 % misspells nothing and 4 % and 6 % the same words. The rows and
    Table 6 give the share actually misspelled, and the log says so (Table 6 showed only the requested rate)."""
    monkeypatch.setattr(rb, "decode", lambda lm, records, task, settings: (
        [r["response"] for r in records], {"seconds": 0.0}, ["h"] * len(records)))
    text = " ".join(["tumour"] * 20)  # 20 words: 2 % → 0 words, 4 % and 6 % → 1 word
    recs = [{"id": i, "instruction": "Answer.", "context": text, "response": "x"} for i in range(3)]
    logs = []
    res = rb.misspelling_sweep(object(), {"diagnosis": recs}, tmp_path, rates=[0.02, 0.04, 0.06, 0.5],
                               log=logs.append)
    got = [(r["rate"], r["misspelled_words"], r["eligible_words"], r["misspelled_share"]) for r in res.rows]
    assert got == [(0.02, 0, 60, 0.0), (0.04, 3, 60, 0.05), (0.06, 3, 60, 0.05), (0.5, 30, 60, 0.5)]
    assert any("rate 0.06 misspells the very words of rate 0.04" in m for m in logs)
    assert any("3 of 3 test texts have too few words" in m and "0.02" in m for m in logs)
    assert not any("too few words" in m and " 0.5:" in m for m in logs)
    table = Path(rb.write_outputs(tmp_path, res, "m")["table"]).read_text()
    assert "| Task | Model | rate | misspelled | EM P |" in table
    assert "Misspelling robustness on diagnosis generation (" in table
    assert "| diagnosis | m | 2% | 0.00% |" in table and "|  |  | 6% | 5.00% |" in table
    key = json.loads((tmp_path / "misspell" / "diagnosis" / "rate_04" / "scores.json").read_text())["settings"]
    assert key["noisy_set"] != json.loads((tmp_path / "misspell" / "diagnosis" / "rate_50" / "scores.json")
                                          .read_text())["settings"]["noisy_set"]


def test_misspelling_a_phenotype_question_is_warned_only_without_a_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(rb, "decode", lambda lm, records, task, settings: (
        [r["response"] for r in records], {"seconds": 0.0}, ["h"] * len(records)))
    recs = _recs("phenotype", 2)
    logs = []
    rb.misspelling_sweep(object(), {"phenotype": recs}, tmp_path / "a", rates=[0.5], log=logs.append)
    assert not any("question" in m for m in logs)
    bare = [{k: v for k, v in r.items() if k != "sentence"} for r in recs]
    rb.misspelling_sweep(object(), {"phenotype": bare}, tmp_path / "b", rates=[0.5], log=logs.append)
    assert any("2 of 2 test records name no 'sentence'" in m and "the question too" in m for m in logs)


def test_counterfactual_warns_when_records_name_no_entity_type(tmp_path):
    logs = []

    def trainer(cmd, log_path):
        raise SystemExit("stop here")  # the warning comes before any training

    recs = [{k: v for k, v in r.items() if k != "entity_type"} for r in _recs("phenotype", 4)]
    with pytest.raises(SystemExit):
        rb.counterfactual_sweep("base", recs, [], recs, tmp_path, rates=[0.5], trainer=trainer, log=logs.append)
    assert any("4 of 4 training records name no 'entity_type'" in m for m in logs)
    settings = json.loads((tmp_path / "counterfactual" / "rate_50" / "settings.json").read_text())
    assert len(settings["corrupted_set"]) == 16  # the corrupted labels' digest is part of a rate's settings


def test_results_of_an_earlier_version_are_reused_when_their_saved_inputs_match(tmp_path, monkeypatch):
    """Rates computed before the noisy / corrupted inputs' digests were recorded are reused when the inputs saved
    beside them have those digests (they were refused, and --overwrite re-trained every counterfactual rate), and
    refused when the saved inputs differ."""
    from cancerllm_jax.errors import UserError

    decoded, trained = [], []

    def fake_decode(lm, records, task, settings):
        decoded.append(task)
        return [r["response"] for r in records], {"seconds": 0.0}, ["h"] * len(records)

    def fake_trainer(cmd, log_path):
        trained.append(cmd)
        (Path(cmd[cmd.index("--workdir") + 1]) / "checkpoints").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(rb, "decode", fake_decode)
    monkeypatch.setattr(rb, "load_model", lambda path, dtype, adapter=None: path)
    model = _fake_model(tmp_path / "m")

    def forget(path, name):  # as the previous version wrote it: no such digest
        data = json.loads(path.read_text())
        (data["settings"] if path.name == "scores.json" else data).pop(name)
        path.write_text(json.dumps(data))

    def misspell():
        rb.misspelling_sweep(model, {"diagnosis": _recs("diagnosis", 3)}, tmp_path / "o", rates=[0.5],
                             log=lambda s: None)

    misspell()
    d = tmp_path / "o" / "misspell" / "diagnosis" / "rate_50"
    forget(d / "scores.json", "noisy_set")
    misspell()
    assert decoded == ["diagnosis"]  # reused
    rows = [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]
    rows[0]["context"] += " edited"
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="noisy_set"):
        misspell()

    def counterfactual():
        rb.counterfactual_sweep(model, _recs("phenotype", 10), [], _recs("phenotype", 2), tmp_path / "c",
                                rates=[0.5], trainer=fake_trainer, log=lambda s: None)

    counterfactual()
    d = tmp_path / "c" / "counterfactual" / "rate_50"
    forget(d / "scores.json", "corrupted_set")
    forget(d / "settings.json", "corrupted_set")
    counterfactual()
    assert len(trained) == 1 and decoded.count("phenotype") == 1  # reused: neither trained nor scored again
    (d / "scores.json").unlink()  # cut short: the run is continued (the fake one never finishes), not refused
    counterfactual()
    assert len(trained) == 2 and "--resume" in trained[1] and decoded.count("phenotype") == 2
    assert "corrupted_set" in json.loads((d / "settings.json").read_text())  # recorded from now on


def test_cli_misspell_runs_on_the_tiny_preset(tmp_path, capsys):
    """Issue 5: the sweeps run on a CPU "with SmolLM2 or `tiny`"; misspell used to refuse a preset name. A preset
    loads as its random weights (seed 0) with the Mistral v1 tokenizer; a 7B preset is refused, naming why."""
    import cancerllm_jax as cj
    from cancerllm_jax.errors import UserError

    data = tmp_path / "diagnosis.jsonl"
    data.write_text("".join(json.dumps({"id": f"n{i}", "context": "Metastatic lung cancer with brain mets, stage IV "
                                        "adenocarcinoma of the right upper lobe.", "response": "lung cancer"}) + "\n"
                            for i in range(2)))
    _launch_robustness().main.__wrapped__(["misspell", "--model", "tiny", "--data", str(data), "--tasks", "diagnosis",
                                           "--out", str(tmp_path / "o"), "--rates", "0.2", "--max-new-tokens", "2"])
    result = json.loads((tmp_path / "o" / "robustness.json").read_text())
    assert (tmp_path / "o" / "table6.md").exists() and "misspell" in result, result.keys()
    a, b = cj.load("tiny").logits([1, 851, 349]), cj.load("tiny").logits([1, 851, 349])
    assert a.shape == (3, 32000) and (a == b).all()  # the same random weights at every load
    with pytest.raises(UserError, match=r"mistral-7b-v0.1 is a preset of random weights, 7.2B parameters"):
        cj.load("mistral-7b-v0.1")
