"""The benchmark tools' own logic (not their timings): how rounds of a side combine, argument checks, and what
they write (strict JSON, Markdown rows)."""
import importlib.util
import json
import math
import os

import numpy as np
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
    # the compiled step's temporaries (ours) ride along into the row's cell; absent (torch), no words for them
    a["compiled_temp_bytes"], b["compiled_temp_bytes"] = 2 ** 30, 3 * 2 ** 30
    out = bench_train.combine_rounds([a, b], 100)
    assert bench_train.fmt_temp(out) == ", temporaries 3.00 GiB" and bench_train.fmt_temp(side([1.0], 1)) == ""


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--batch", "0"], ["--seq", "-1"], ["--rank", "0"],
                                  ["--steps", "x"], ["--response-fraction", "0"], ["--response-fraction", "1.5"],
                                  ["--smollm2-dir", "/nonexistent/smollm2"], ["--onl", "ours"],
                                  # no GPU here: was a traceback in our child, then a one-sided docs row
                                  ["--preset", "tiny", "--attention", "cudnn"],
                                  ["--preset", "tiny", "--json", "/proc/x.json"]])  # lost after the whole run
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
                                  ["--preset", "mistral-7b", "--prompt-tokens", "4"],
                                  ["--preset", "tiny", "--attention", "cudnn", "--dtype", "bfloat16"]])
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
    ("profile_step", ["train", "--preset", "tiny", "--response-fraction", "0"]),
    ("profile_step", ["decode", "--preset", "tiny", "--prompt-tokens", "16", "--new", "2"]),  # a UserError: one line
    ("check_parity", ["--hf-dir", "x", "--tol", "-1"]), ("check_parity", ["--hf-dir", "x", "--tol", "nan"]),
    ("check_parity", ["--hf-dir", "x", "--min-agree", "101"]), ("check_parity", ["--hf-dir", "x", "--json", ROOT]),
    ("measure_bf16", ["--json", "/nonexistent/a.json"]), ("measure_bf16", ["--smollm2-dir", "/nonexistent/s"]),
    ("crash_test", ["--save-every", "0"]), ("crash_test", ["--eval-every", "0"]), ("crash_test", ["--timeout", "0"]),
    ("crash_test", ["--batch-size", "0"]),
    ("bench_gemm", ["--repeats", "0"]), ("bench_gemm", ["--shapes", "8x8"]), ("bench_gemm", ["--shapes", "8x0x8"]),
    ("bench_gemm", ["--json", "/nonexistent/a.json"]),
])
def test_bad_tool_arguments_are_one_clear_error_before_any_work(tool, args, capsys):
    """Checked before anything runs (was: a ZeroDivisionError, a median of nothing, a traceback after the run)."""
    with pytest.raises(SystemExit) as e:
        _tool(tool).main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and "this is a bug" not in err


def test_profile_step_profiles_a_train_step(capsys):
    """``profile_step.py train`` builds bench_train's step (it crashed on a flag bench_train added)."""
    assert _tool("profile_step").main(["train", "--preset", "tiny", "--seq", "16", "--dtype", "float32",
                                       "--response-fraction", "0.5"]) == 0
    assert "== train step tiny batch 1 x seq 16" in capsys.readouterr().out


def test_check_parity_counts_non_finite_logits_as_disagreement():
    """All-NaN rows have argmax 0 on both sides: they scored 100 % agreement beside a NaN difference."""
    cp = _tool("check_parity")
    ref = np.zeros((3, 5))
    ref[:, 2] = 1.0
    bad = ref.copy()
    bad[1] = np.nan
    assert cp.compare_logits(ref, ref)["argmax_agree_pct"] == 100.0
    assert cp.compare_logits(ref, bad)["argmax_agree_pct"] == pytest.approx(200 / 3)
    assert cp.compare_logits(bad, bad)["argmax_agree_pct"] == pytest.approx(200 / 3)


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


def test_decode_roofline_reads_only_what_a_step_needs(bench_decode):
    """An untied embedding table is not read by a decode step (only its looked-up rows; the LM head is), and a
    query reads at most the sliding window of the KV cache (was: all of num_params, every filled slot)."""
    from cancerllm_jax.config import PRESETS

    m = PRESETS["mistral-7b-v0.1"]  # untied, window 4096
    per_slot = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2
    b = bench_decode.decode_step_bytes(m, 2, 1, 600.0, 640)
    assert b["weight_bytes"] == 2 * (m.num_params() - (m.vocab_size - 1) * m.hidden_size)
    assert b["kv_bytes_min"] == 600 * per_slot and b["kv_bytes_read"] == 640 * per_slot
    assert bench_decode.decode_step_bytes(m, 2, 4, 9000.0)["kv_bytes_min"] == 4 * 4096 * per_slot
    tiny = PRESETS["tiny"]  # tied: the table is read once, as the LM head
    assert bench_decode.decode_step_bytes(tiny, 4, 8, 10.0)["weight_bytes"] == 4 * tiny.num_params()


def test_roofline_against_the_spec_and_for_every_side(bench_decode):
    """The datasheet bandwidth is matched by the device name's words and gives a second fraction; another step time
    (transformers' sides: the same bytes) rescales both; the loop-timed bandwidth runs (here on the CPU)."""
    import jax.numpy as jnp

    from cancerllm_jax.config import PRESETS

    assert bench_decode.hbm_spec("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench_decode.hbm_spec("NVIDIA H100 PCIe") == 2.0e12 and bench_decode.hbm_spec("NVIDIA A10G") is None
    m = PRESETS["mistral-7b-v0.1"]
    r = bench_decode.roofline(m, 2, 1, 512, 128, 640, 6.67e-3, 2.72e12, 3.35e12)
    bytes_ = r["weight_bytes"] + r["kv_bytes_min"]
    assert r["roofline_fraction"] == pytest.approx(bytes_ / 2.72e12 / 6.67e-3)
    assert r["roofline_fraction_of_spec"] == pytest.approx(bytes_ / 3.35e12 / 6.67e-3)
    theirs = bench_decode.with_step_time(r, 40.1e-3)
    assert theirs["roofline_fraction"] == pytest.approx(bytes_ / 2.72e12 / 40.1e-3)
    assert theirs["roofline_fraction_of_spec"] == pytest.approx(bytes_ / 3.35e12 / 40.1e-3)
    assert bench_decode.measured_bandwidth(jnp.ones((1 << 16,), jnp.float32), runs=2, passes=3) > 0


def test_hf_generate_is_plain_greedy_whatever_the_folder_defaults(bench_decode, tmp_path):
    """A checkpoint's generation_config.json (here a repetition penalty) once changed transformers' side from
    plain greedy decoding, so the sides did different work and 'greedy agreement' compared different things."""
    import json
    import types

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(gen, repetition_penalty=5.0)))
    hf, dev = bench_decode.load_hf(types.SimpleNamespace(dtype="float32"), None, str(tmp_path))
    ids = [1, 5, 7, 9]
    got = bench_decode.hf_generate(hf, dev, [ids], 8)[0]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[4:]


def test_mfu_only_against_the_peak_of_the_run_dtype(bench_train):
    """The peak table holds dense bf16 peaks: a float32 run's 'MFU' against it was no MFU (its peak is TF32's or
    fp32's); the trainer's logged MFU follows the same rule."""
    from cancerllm_jax.train.step import mfu_peak

    assert mfu_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert mfu_peak("NVIDIA H100 80GB HBM3", "float32") is None
    assert mfu_peak("cpu", "bfloat16") is None


def test_a_failed_side_is_recorded_not_just_missing(bench_train, monkeypatch, tmp_path):
    """A side that failed once left a JSON that looked like an ``--only`` run of the other side."""
    import json

    def run_side(cmd, label, out, smollm2_dir, host_malloc=None):
        return (side([1.0, 1.0], 64), 0) if label == "ours" else (None, 3)

    monkeypatch.setattr(bench_train, "run_side", run_side)
    monkeypatch.setattr(bench_train, "machine", lambda: "test machine")
    path = tmp_path / "r.json"
    assert bench_train.main(["--preset", "tiny", "--no-doc", "--json", str(path)]) == 3
    out = json.loads(path.read_text())
    assert list(out["results"]) == ["ours"] and out["failed_sides"] == ["torch"]
    args = type("A", (), {"note": "x"})()
    assert bench_train.note_failed(args, ["ours", "torch"], {"ours": {}}) == ["torch"]
    assert args.note == "x; failed: torch"


def test_decode_roofline_of_each_side_counts_the_rows_it_reads(bench_decode, monkeypatch, tmp_path):
    """The one-at-a-time side's step reads the weights and one row of KV cache (it was credited with ours' batch
    of rows: 1.9× its fraction at batch 64 × 1500 tokens); a side named twice in --only runs once."""
    import json

    from cancerllm_jax.config import PRESETS

    cfg, b, plen, new, bw = PRESETS["mistral-7b-v0.1"], 64, 1500, 16, 4.0e12
    ran = []

    def run_side(cmd, label, out, smollm2_dir, host_malloc=None):
        side = cmd[-1]
        ran.append(side)
        step = 0.030 if side == "ours" else 0.008
        res = {"tokens_per_s": 1, "total_s": 1, "ttft_s": 0.1, "ms_per_step": 1e3 * step, "batches": 1,
               "peak_rss": 1, "runs": {"full_s": [1], "one_s": [0.1]}, "tokens": [[1]] * b}
        if side == "ours":
            res["roofline"] = bench_decode.roofline(cfg, 2, b, plen, new, plen + new, step, bw)
            res["roofline_one_row"] = bench_decode.roofline(cfg, 2, 1, plen, new, plen + new, step, bw)
        return res, 0

    monkeypatch.setattr(bench_decode.bt, "run_side", run_side)
    monkeypatch.setattr(bench_decode, "make_prompts", lambda args: [[1] * plen] * b)
    monkeypatch.setattr(bench_decode.bt, "machine", lambda: "test machine")
    path = tmp_path / "d.json"
    bench_decode.main(["--preset", "mistral-7b", "--only", "ours", "--only", "hf-single", "--only", "ours",
                       "--batch", str(b), "--prompts", str(b), "--new", str(new), "--prompt-tokens", "2048",
                       "--no-doc", "--json", str(path)])
    assert ran == ["ours", "hf-single"]
    got = json.loads(path.read_text())["results"]["hf-single"]["roofline"]["roofline_fraction"]
    one = bench_decode.decode_step_bytes(cfg, 2, 1, plen + new / 2)
    assert got == pytest.approx((one["weight_bytes"] + one["kv_bytes_min"]) / bw / 0.008)


def test_attention_bench_credits_torch_with_the_keys_it_attends(monkeypatch, tmp_path):
    """torch's sdpa runs without the sliding window: past the window it does more work than the windowed count."""
    import json

    ba = _tool("bench_attention")
    monkeypatch.setattr(ba, "run_jax", lambda a: {"einsum (explicit mask)": 1.0})
    monkeypatch.setattr(ba, "run_torch", lambda a: {"torch sdpa (is_causal, no window)": 1.0})
    path = tmp_path / "a.json"
    assert ba.main(["--seq", "64", "--window", "16", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
                    "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert rows["einsum (explicit mask)"]["tflops"] == pytest.approx(ba.causal_flops(1, 64, 2, 8, 16) / 1e12)
    assert rows["torch sdpa (is_causal, no window)"]["tflops"] == pytest.approx(
        ba.causal_flops(1, 64, 2, 8, None) / 1e12)


def test_torch_remat_is_recorded_as_what_torch_runs(bench_train):
    """transformers has no 'dots' policy: its side checkpoints whole layers, and says so."""
    assert [bench_train.torch_remat(r) for r in ("none", "full", "dots")] == ["none", "full", "full"]


def test_gemm_bench_reports_both_libraries(tmp_path):
    out = tmp_path / "g.json"
    assert _tool("bench_gemm").main(["--shapes", "8x16x4,2x3x5", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["shape"] for r in rows] == ["8x16x4", "2x3x5"]
    assert all(r["jax_gflops"] > 0 and r["torch_gflops"] > 0 for r in rows)


def test_other_processes_cpu_use_is_measured_and_flags_the_row(bench_train, monkeypatch):
    """On a shared CPU another process's load slows torch's spinning threads 4-20x where XLA's barely move: each
    side records the share of the machine others used while it ran, and a row above 10 % says so."""
    monkeypatch.setattr(bench_train.os, "cpu_count", lambda: 2)
    # 10 s wall on 2 cores = 20 core-seconds; the machine was busy 13, the child used 9: others 4 -> 20 %
    assert bench_train.others_cpu_share(100.0, 113.0, 9.0, 10.0) == pytest.approx(0.2)
    assert bench_train.others_cpu_share(100.0, 108.0, 9.0, 10.0) == 0.0  # clock granularity: never negative
    assert bench_train.others_cpu_share(None, 108.0, 9.0, 10.0) is None
    note = bench_train.contention_note({"ours": {"others_cpu": 0.02}, "torch": {"others_cpu": 0.2}})
    assert "20% during torch" in note and "ours" not in note and "unreliable" in note
    assert bench_train.contention_note({"ours": {"others_cpu": None}, "torch": {}}) == ""
    merged = bench_train.merge_round_costs({"others_cpu": 0.0}, [{"others_cpu": 0.05}, {"others_cpu": 0.3}])
    assert merged["others_cpu"] == 0.3  # the busiest round
    assert bench_train.cpu_busy_s() is None or bench_train.cpu_busy_s() > 0


def test_a_step_time_that_noise_makes_negative_is_not_reported(bench_decode, capsys):
    assert bench_decode.step_time(3.0, 1.0, 11, 2, "ours") == pytest.approx(0.1)
    assert math.isnan(bench_decode.step_time(1.0, 1.2, 11, 2, "transformers"))
    assert "was not slower than the 1-token run" in capsys.readouterr().err
    r = generation([1.0], [1.2])
    r["ms_per_step"] = bench_decode.step_time(1.0, 1.2, 11, 2, "ours")
    assert bench_decode._ms_step(r) == "-"


def test_dtype_defaults_to_bf16_only_for_the_7b_preset(bench_train):
    """``--preset mistral-7b`` timed fp32 weights (29 GB) unless --dtype was given; its docs say bf16."""
    import argparse

    for preset, dtype in (("mistral-7b", "bfloat16"), ("tiny", "float32"), ("smollm2-135m", "float32")):
        args = argparse.Namespace(preset=preset, dtype=None, attention="auto")
        bench_train.resolve_dtype_and_attention(argparse.ArgumentParser(), args)
        assert args.dtype == dtype


def test_fine_tuning_batches_put_the_loss_on_each_rows_response(bench_train):
    """``--response-fraction``: the loss on each row's last tokens (its response), torch's prompt labels -100."""
    from cancerllm_jax.config import PRESETS

    raw = bench_train.make_batch(PRESETS["tiny"], 2, 10, response=0.3)
    assert raw["loss_mask"].tolist() == [[0] * 7 + [1] * 3] * 2
    assert bench_train.make_batch(PRESETS["tiny"], 1, 4)["loss_mask"].tolist() == [[1] * 4]
