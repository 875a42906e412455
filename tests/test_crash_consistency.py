"""Crash consistency: SIGKILL a training run at random moments, resume each time, end bit-identical.

Runs ``tools/crash_test.py`` (the script users run themselves, ``--kills 20`` by default) with a few kills to stay
fast; the compile cache of tests/conftest.py is inherited, so each launcher start is a warm start.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "crash_test.py"), "--kills", "4",
                          "--seed", "38", "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    assert summary["ok"] and summary["kills"] == 4 and not summary["failures"]
    assert summary["history_entries"] == 12 + 5  # 12 step losses + eval losses at steps 0 (baseline), 3, 6, 9, 12
    assert all(summary["moments"][m] >= 1 for m in ("step", "checkpoint", "eval", "startup")), summary["moments"]
    assert "bit-identical" in res.stdout
    # no manual cleanup happened, and the resumed run is a normal, loadable run
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints"))[-1] == "12"
