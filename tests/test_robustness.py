"""The sweep plumbing without a model: a fake trainer and decoder, then the tables, JSON and PNG."""
import json
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
        return ["left"] * k + ["right"] * (len(records) - k), {"seconds": 0.0}

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
    # a second run reuses the finished rates: no training
    calls.clear()
    rb.counterfactual_sweep("base", _recs("phenotype", 10), [], _recs("phenotype", 4), tmp_path / "cf",
                            rates=[0.2, 0.8], log=lambda s: None)
    assert calls == []
    paths = rb.write_outputs(tmp_path / "out", res, "fake")
    table = Path(paths["table"]).read_text()
    assert "Table 5" in table and "| 20% |" in table and "**50.00**" in table
    assert json.loads(Path(paths["json"]).read_text())["counterfactual"]["mean_avg_f1"] == {"phenotype": 50.0}
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"


def test_misspelling_sweep_and_clean_reference(tmp_path, monkeypatch):
    seen = {}

    def fake_decode(lm, records, task, settings):
        seen[(task, records[0]["noise"]["rate"])] = records[0]["context"]
        return [r["response"] if r["noise"]["words"] == 0 else "x" for r in records], {"seconds": 0.0}

    monkeypatch.setattr(rb, "decode", fake_decode)
    tests = {"diagnosis": _recs("diagnosis", 3), "treatment_plan": _recs("treatment_plan", 3)}
    res = rb.misspelling_sweep(object(), tests, tmp_path, rates=[0.0, 0.5], log=lambda s: None)
    assert [(r["task"], r["rate"], r["avg_f1"]) for r in res.rows] == [
        ("diagnosis", 0.0, 100.0), ("diagnosis", 0.5, 0.0), ("treatment_plan", 0.0, 100.0),
        ("treatment_plan", 0.5, 0.0)]
    assert res.mean_avg_f1 == {"diagnosis": 0.0, "treatment_plan": 0.0}  # rate 0 is not in the mean
    assert seen[("diagnosis", 0.0)] == "the left breast mass 0 cm" != seen[("diagnosis", 0.5)]
    paths = rb.write_outputs(tmp_path, res, "fake")
    assert "0% (clean)" in Path(paths["table"]).read_text()


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
    assert [r["response"] for r in rb.load_split(str(tmp_path), "phenotype", "test")] == ["lung cancer"] * 2
