"""The benchmark tools' own logic (not their timings): how rounds of a side combine, argument checks, and what
they write (strict JSON, Markdown rows)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train_under_test", os.path.join(ROOT, "tools/bench_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def side(times, tokens, gflops_per_token=2.0, rss=100, compile_s=1.0):
    med = sorted(times)[len(times) // 2]
    return {"ms_per_step": 1e3 * med, "tokens_per_s": tokens / med, "ms_min": 1e3 * min(times),
            "ms_max": 1e3 * max(times), "steps_timed": len(times), "first_loss": 3.0, "last_loss": 2.0,
            "step_s": list(times), "gflops": gflops_per_token * tokens / med / 1e9, "peak_rss": rss,
            "compile_s": compile_s}


def test_rounds_combine_into_the_median_of_every_step(bench_train):
    a, b = side([1.0, 2.0, 1.5], 100, rss=100, compile_s=5.0), side([4.0, 6.0, 5.0], 100, rss=300, compile_s=7.0)
    b["last_loss"] = 1.5
    out = bench_train.combine_rounds([a, b], 100)
    assert out["steps_timed"] == 6 and out["ms_per_step"] == pytest.approx(3000.0)  # not the 3250 of round medians
    assert out["tokens_per_s"] == pytest.approx(100 / 3.0)
    assert out["gflops"] == pytest.approx(2.0 * 100 / 3.0 / 1e9)
    assert out["ms_min"] == pytest.approx(1000.0) and out["ms_max"] == pytest.approx(6000.0)
    assert out["peak_rss"] == 300 and out["compile_s"] == pytest.approx(6.0)
    assert out["round_ms_per_step"] == [pytest.approx(1500.0), pytest.approx(5000.0)] and out["rounds"] == 2
    assert out["first_loss"] == 3.0 and out["last_loss"] == 1.5
    assert bench_train.combine_rounds([a], 100) is a


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--batch", "0"], ["--seq", "-1"], ["--rank", "0"],
                                  ["--steps", "x"], ["--smollm2-dir", "/nonexistent/smollm2"], ["--onl", "ours"]])
def test_bad_train_arguments_are_one_clear_error(bench_train, args, capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.main(args + ["--no-doc"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_doc_cells_and_json_stay_well_formed(bench_train):
    assert bench_train.md_cell("a|b\nc") == "a\\|b c"
    row = f"| `{bench_train.md_cell('--note x|y')}` | {bench_train.md_cell('p|q')} |"
    assert len([c for c in row.replace("\\|", "").split("|")]) == 4  # two cells, whatever the text holds
    assert bench_train.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None, "b": [1.0, None], "c": "x"}


@pytest.fixture(scope="module")
def bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode_under_test",
                                                  os.path.join(ROOT, "tools/bench_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generation(full_s, one_s, batches=2, prompts=8, new=11, rss=10):
    full, one = sorted(full_s)[len(full_s) // 2], sorted(one_s)[len(one_s) // 2]
    return {"tokens_per_s": prompts * new / full, "total_s": full, "ttft_s": one / batches,
            "ms_per_step": 1e3 * (full - one) / (new - 1) / batches, "batches": batches, "peak_rss": rss,
            "runs": {"full_s": list(full_s), "one_s": list(one_s)}, "compile_s": 4.0, "tokens": [[1]] * prompts,
            "roofline": {"ideal_step_s": 0.01, "roofline_fraction": 0.01 / ((full - one) / (new - 1) / batches)}}


def test_generation_rounds_combine_every_run(bench_decode):
    a = generation([2.0, 2.2, 2.1], [0.5, 0.5, 0.5])
    b = generation([3.0], [0.7], rss=30)
    out = bench_decode.combine_rounds([a, b], 8, 11)
    full, one = 2.15, 0.5  # medians over all four runs (the two rounds' medians would give 2.55 and 0.6)
    assert out["total_s"] == pytest.approx(full) and out["tokens_per_s"] == pytest.approx(88 / full)
    assert out["ttft_s"] == pytest.approx(one / 2)
    step = (full - one) / 10 / 2
    assert out["ms_per_step"] == pytest.approx(1e3 * step)
    assert out["roofline"]["roofline_fraction"] == pytest.approx(0.01 / step)
    assert out["peak_rss"] == 30 and out["rounds"] == 2 and out["round_total_s"] == [2.1, 3.0]
    assert bench_decode.combine_rounds([a], 8, 11) is a
    assert bench_decode.bt.round_ratios({"ours": [a, b], "hf-batched": [b, a]}, "hf-batched") == [
        pytest.approx(3.0 / 2.1), pytest.approx(2.1 / 3.0)]
    assert bench_decode.bt.round_ratios({"ours": [a], "hf-batched": [b]}, "hf-batched") is None


@pytest.mark.parametrize("args", [["--prompts", "0"], ["--batch", "0"], ["--repeats", "0"], ["--hf-repeats", "0"],
                                  ["--rounds", "0"], ["--new", "1"], ["--prompt-tokens", "0"], ["--onl", "ours"],
                                  ["--preset", "mistral-7b", "--prompt-tokens", "4"]])
def test_bad_generation_arguments_are_one_clear_error(bench_decode, args, capsys):
    with pytest.raises(SystemExit) as e:
        bench_decode.main(args + ["--no-doc"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tool,args", [
    ("bench_attention", ["--iters", "0"]), ("bench_attention", ["--seq", "-1"]),
    ("bench_attention", ["--heads", "3", "--kv-heads", "2"]), ("bench_attention", ["--window", "-1"]),
    ("bench_attention", ["--json", "/nonexistent/a.json"]), ("bench_attention", ["--json", ROOT]),
    ("bench_train", ["--no-doc", "--json", "/nonexistent/a.json"]), ("bench_train", ["--no-doc", "--json", ROOT]),
    ("bench_decode", ["--no-doc", "--json", "/nonexistent/a.json"]),
    ("profile_step", ["train", "--seq", "0"]), ("profile_step", ["decode", "--new", "0"]),
    ("check_parity", ["--hf-dir", "x", "--tol", "-1"]), ("check_parity", ["--hf-dir", "x", "--tol", "nan"]),
    ("check_parity", ["--hf-dir", "x", "--min-agree", "101"]), ("check_parity", ["--hf-dir", "x", "--json", ROOT]),
    ("measure_bf16", ["--json", "/nonexistent/a.json"]), ("measure_bf16", ["--smollm2-dir", "/nonexistent/s"]),
    ("crash_test", ["--save-every", "0"]), ("crash_test", ["--eval-every", "0"]), ("crash_test", ["--timeout", "0"]),
    ("crash_test", ["--batch-size", "0"]),
])
def test_bad_tool_arguments_are_one_clear_error_before_any_work(tool, args, capsys):
    """Checked before anything runs (was: a ZeroDivisionError, a median of nothing, a traceback after the run)."""
    with pytest.raises(SystemExit) as e:
        _tool(tool).main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and "this is a bug" not in err


def test_check_parity_refuses_an_empty_prompt(tmp_path):
    from cancerllm_jax.errors import UserError

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a note"}\n{"text": " "}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: .*non-empty"):
        _tool("check_parity").read_prompts(str(path))


def test_json_output_is_strict_and_atomic(bench_train, tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    bench_train.write_json(str(path), {"x": float("nan"), "y": 1})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"x":null,"y":1}'
    assert os.listdir(tmp_path) == ["r.json"]


def test_decode_prompts_of_one_task_are_all_different(bench_decode):
    """--task diagnosis --prompts n once drew n/2 patients, so every prompt was there twice."""
    from cancerllm_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    for task in ("diagnosis", "treatment_plan", "phenotype"):
        prompts = bench_decode.clinical_prompts(tok, 20, 512, task=task)
        assert len(prompts) == 20 and len({tuple(p) for p in prompts}) == 20, task
