"""The benchmark tools' own logic (not their timings): how rounds of a side combine."""
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


def test_rounds_must_be_positive(bench_train):
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--rounds", "0", "--no-doc"])
    assert e.value.code == 2
