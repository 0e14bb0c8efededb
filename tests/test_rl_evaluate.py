"""rl/evaluate.py: greedy rollouts through the training loop on fixed SynthHR items, per-subset summary, comparison."""
from __future__ import annotations

import json
from pathlib import Path

from test_rl_train_grpo import one_thread  # noqa: F401  (autouse: one torch thread)

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_and_compare(tmp_path):
    from rl.evaluate import main

    out = tmp_path / "before"
    summary = main(["--config", str(ROOT / "rl/configs/cpu_smoke.yaml"), "--output_dir", str(out),
                    "--limit_per_subset", "2", "--eval_subsets", "attr-cue,coarse",
                    "--per_device_eval_batch_size", "4"])
    assert summary["overall"]["items"] == 4 and set(summary) == {"overall", "attr-cue", "coarse"}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["item_id"] for r in records) == sorted(
        f"synthhr-mini-test-{s}-{i:05d}" for s in ("attr-cue", "coarse") for i in range(2))
    assert all(r["subset"] == "coarse" and r["needs_hr"] is False for r in records if "coarse" in r["item_id"])
    assert all(r["text"].startswith("assistant: ") for r in records)  # what the policy wrote, for the reader
    saved = json.loads((out / "summary.json").read_text())
    assert saved["split"] == "test" and saved["summary"]["overall"]["seconds_per_item"] > 0
    (tmp_path / "after").mkdir()
    (tmp_path / "after" / "summary.json").write_text(json.dumps({**saved, "label": "after"}))
    table = main(["--compare", f"{out},{tmp_path / 'after'}", "--output_dir", str(tmp_path)])
    assert table is None
    text = (tmp_path / "comparison.md").read_text()
    assert "| before |" in text and "| after |" in text and "| coarse |" in text
