"""Safety by default: no pickle, no remote code, no network, no note text in what a run writes."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = [r"torch\.load\(", r"pickle\.loads?\(", r"trust_remote_code\s*=\s*True", r"allow_pickle\s*=\s*True",
             r"np\.load\(.*allow_pickle"]


def test_package_never_unpickles_or_runs_remote_code():
    hits = []
    for folder in ("cancerllm_jax", "launch", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for pattern in FORBIDDEN:
                for m in re.finditer(pattern, text):
                    hits.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not hits, hits


def test_importing_the_package_sets_hub_offline(monkeypatch):
    code = "import os, cancerllm_jax; print(os.environ.get('HF_HUB_OFFLINE'))"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "1", out.stderr


NO_NET = """
import socket
def _refuse(self, *a, **k):
    with open({log!r}, "a") as f:
        f.write(repr(a) + "\\n")
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = lambda *a, **k: _refuse(None, *a)
"""

PLANTED = ["ZQXJ-PLANTED-7731", "Marguerite Vandersloot-Quill", "MRN 99-417-2286"]


@pytest.mark.slow
def test_pretrain_run_without_network_leaks_no_note_text(tmp_path):
    """A pretraining run on notes with planted identifiers, sockets disabled: it succeeds, nothing connects, and
    no file it writes (logs, metrics, TensorBoard, checkpoints, config) contains the planted strings."""
    site = tmp_path / "site"
    site.mkdir()
    attempts = tmp_path / "connect_attempts.log"
    (site / "sitecustomize.py").write_text(NO_NET.format(log=str(attempts)))
    notes = tmp_path / "notes.jsonl"
    with open(notes, "w") as f:
        for i in range(40):
            secret = PLANTED[i % len(PLANTED)]
            text = (f"Patient {secret} seen for follow-up of left breast ca, ER+/PR+, HER2-. "
                    f"Tolerating anastrozole. Plan: continue, rtc 3 months. Note {i}. " * 3)
            f.write(json.dumps({"text": text}) + "\n")
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "launch/pretrain.py", "--mesh", "1x1", "--steps", "2", "--batch-size", "2",
           "--workdir", str(workdir), "data.block_size=32", "lora.rank=2", "--data", str(notes)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not attempts.exists(), attempts.read_text()
    for secret in PLANTED:
        assert secret not in out.stdout + out.stderr
    leaks = []
    for path in workdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"{path.relative_to(workdir)}: {s}" for s in PLANTED if s.encode() in data]
    assert not leaks, leaks
