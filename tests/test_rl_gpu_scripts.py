"""rl/gpu_session.sh, gpu_launch.sh and gpu_collect.sh: the shell side of a GPU session (syntax, and what a poll
brings back)."""
from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_scripts_parse():
    for name in ("gpu_session.sh", "gpu_collect.sh", "gpu_launch.sh", "gpu_poll.sh", "pack_carry.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "rl" / name)], check=True)


def test_collect_brings_back_small_outputs_only(tmp_path):
    run = tmp_path / "gpu"
    files = {"ours/eval_before/summary.json": "{}", "ours/rl/zoom_stats.jsonl": "{}\n", "ours/rl.log": "log",
             "ours/traces/report.json": "{}", "ours/traces/traces.jsonl": "big", "ours/traces/images/0.png": "x",
             "ours/rl/checkpoint-40/optimizer.pt": "x", "ours/sft_policy/config.json": "{}",
             "ours/rl/model.safetensors": "x", "comparison.md": "| table |", "ours_curves.png": "png"}
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "rl" / "gpu_collect.sh"), str(run), str(out)], check=True,
                   capture_output=True)
    with tarfile.open(out / "gpu_small.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"ours/eval_before/summary.json", "ours/rl/zoom_stats.jsonl", "ours/rl.log",
            "ours/traces/report.json"} <= names
    assert not any(k in n for n in names for k in ("images", "checkpoint-", "safetensors", "sft_policy",
                                                    "traces.jsonl"))
    assert (out / "comparison.md").read_text() == "| table |" and (out / "ours_curves.png").exists()
    missing = subprocess.run(["bash", str(ROOT / "rl" / "gpu_collect.sh"), str(tmp_path / "none"), str(out)],
                             capture_output=True, text=True)
    assert missing.returncode == 0 and "no " in missing.stdout


def test_poll_stops_at_once_on_a_bare_machine_and_collects_a_finished_run(tmp_path):
    poll = ["bash", str(ROOT / "rl" / "gpu_poll.sh"), "runs/gpu", str(tmp_path / "out")]
    bare = subprocess.run(poll, cwd=tmp_path, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin", "POLL_UNTIL": "600"})
    assert bare.returncode == 3 and "fresh machine" in bare.stdout
    (tmp_path / "runs" / "gpu" / "ours").mkdir(parents=True)
    (tmp_path / "runs" / "gpu" / "ours" / "rl.log").write_text("log")
    (tmp_path / "runs" / "gpu.log").write_text("[12:00:00] ours: done\n[12:00:01] all done\n")
    done = subprocess.run(poll, cwd=tmp_path, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin", "POLL_UNTIL": "600"})
    assert done.returncode == 0 and "all done" in done.stdout
    with tarfile.open(tmp_path / "out" / "gpu_small.tgz") as tar:
        assert "ours/rl.log" in {n.lstrip("./") for n in tar.getnames()}
