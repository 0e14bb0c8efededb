"""tools/pack_heads_state.py: keeps markers, logs and the latest finished stage's model (in bf16), drops superseded
models and finished stages' resume state."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import pack_heads_state  # noqa: E402


def test_pack_keeps_only_the_latest_model_in_bf16(tmp_path):
    from qzoom_agent import QZoomConfig, QZoomModel
    from qzoom_agent.testing import save_tiny_model

    src = tmp_path / "heads"
    for stage in ("rpn", "sft"):
        save_tiny_model(src / stage / "model", "qwen2_5_vl")
        QZoomConfig(family="qwen2_5_vl", twig_K=2, twig_T=2, gate_T=1, has_roi_head=False, has_gate=False,
                    min_visual_tokens=16, max_visual_tokens=64).save(src / stage / "model" / "qzoom_config.json")
        (src / stage / "stage_done.json").write_text("{}\n")
        (src / stage / "checkpoint").mkdir()
        (src / stage / "train_log.jsonl").write_text("{}\n")
    (src / "gate").mkdir()
    (src / "gate" / "checkpoint").mkdir()                            # unfinished stage: resume state is kept
    kept = pack_heads_state.pack(src, tmp_path / "carry")
    dst = tmp_path / "carry"
    assert kept == ["sft"]
    assert not (dst / "rpn" / "model").exists() and (dst / "rpn" / "stage_done.json").exists()
    assert not (dst / "sft" / "checkpoint").exists() and (dst / "gate" / "checkpoint").exists()
    assert (dst / "sft" / "train_log.jsonl").exists()
    m = QZoomModel.from_pretrained(dst / "sft" / "model")
    assert {p.dtype for p in m.base.parameters()} == {torch.bfloat16}
    (tmp_path / "empty").mkdir()
    assert pack_heads_state.pack(tmp_path / "empty", tmp_path / "carry2") == []      # nothing finished: no model
