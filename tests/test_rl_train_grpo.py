"""rl/train_grpo.py end to end on CPU: the CLI smoke run, and fusion preserved inside the trainer.

The fusion test builds the trainer with the script's own `build_trainer` (cpu_smoke.yaml: tiny random Qwen2.5-VL with
q/k gain 4, LoRA, beta 0.04, scripted tool calls through `rl/env.py`'s real `zoom`), trains 2 steps, and inside TRL's
loss path compares the per-token log-probs of every token after a zoom crop with a direct forward of the same
sequence with explicit aligned ids (Q-Zoom's rule as a plain function of the boxes the environment returned), and
with stock ids (the crop as an ordinary image).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_aligned_positions import image_runs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "rl" / "configs" / "cpu_smoke.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI box is small and shared: one torch thread is faster than two oversubscribed ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def parse(argv):
    from trl import GRPOConfig, TrlParser

    from rl.train_grpo import PolicyConfig, ScriptArguments

    return TrlParser((ScriptArguments, GRPOConfig, PolicyConfig)).parse_args_and_config(argv)


def test_cpu_smoke_cli(tmp_path):
    """`python rl/train_grpo.py --config rl/configs/cpu_smoke.yaml` (the CI command), 2 steps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "rl/train_grpo.py", "--config", str(SMOKE), "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["zoom"]["batches"] == 2 and summary["zoom"]["min_call_rate"] > 0
    stats = [json.loads(line) for line in (out / "zoom_stats.jsonl").read_text().splitlines()]
    assert len(stats) == 2 and all(s["crops_per_item"] > 0 for s in stats)
    assert (out / "curves.png").stat().st_size > 1000
    assert len(json.loads((out / "trainer_state.json").read_text())["log_history"]) >= 2
    assert (out / "policy" / "qzoom_config.json").exists() and (out / "policy" / "qzoom_heads.safetensors").exists()
    cfg = json.loads((out / "policy" / "qzoom_config.json").read_text())
    assert cfg["max_visual_tokens"] == 64  # the training budget travels with the policy


def test_trainer_logprobs_use_fused_crop_positions(tmp_path):
    import torch.nn.functional as F

    from qzoom_agent.aligned_positions import (AlignedRopeMixin, aligned_stats, find_cores, is_aligned,
                                               parse_zoom_markers)
    from qzoom_agent.fusion import ImageSlot, sequence_position_ids
    from rl.train_grpo import build_trainer

    script_args, training_args, model_args = parse(
        ["--config", str(SMOKE), "--output_dir", str(tmp_path), "--scripted_p_zoom", "0.9", "--save_policy", "false"])
    trainer, run = build_trainer(script_args, training_args, model_args)
    tok = run.qzoom.processor.tokenizer
    img_id = run.qzoom.base.config.image_token_id
    assert is_aligned(trainer.model) and trainer.ref_model is None  # LoRA: the reference is the adapter-off policy

    def explicit_positions(input_ids, attention_mask, grid_thw, env_markers):
        """Aligned ids from the boxes the environment returned (fusion's rule as a plain function), no seam."""
        pos = torch.zeros(3, *input_ids.shape)
        grids = [(int(t[1]) // 2, int(t[2]) // 2) for t in grid_thw]
        ptr, n_crops = 0, 0
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b].bool()
            ids = input_ids[b, valid]
            n = len(image_runs(ids, img_id))
            slots = [ImageSlot(g) for g in grids[ptr:ptr + n]]
            ptr += n
            markers = parse_zoom_markers(tok.decode(ids.tolist(), skip_special_tokens=False))
            assert len(markers) == n - 1 and set(markers) <= env_markers  # one env marker per crop, in order
            for k, m in enumerate(markers, start=1):
                slots[k] = ImageSlot(slots[k].grid_hw, m.src, m.cells)
                n_crops += 1
            pos[:, b, valid] = sequence_position_ids(ids, img_id, slots)
        return pos, n_crops

    probes = []
    orig = trainer._get_per_token_logps_and_entropies

    def probe(model_, input_ids, attention_mask, logits_to_keep, *args, **kw):
        res = orig(model_, input_ids, attention_mask, logits_to_keep, *args, **kw)
        if not torch.is_grad_enabled() or kw.get("pixel_values") is None:
            return res
        env_markers = {m for env in trainer.environments for s in env.log.markers for m in parse_zoom_markers(s)}
        inputs = {k: kw[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        aligned, n_crops = explicit_positions(input_ids, attention_mask, inputs["image_grid_thw"], env_markers)
        core = find_cores(model_)[0]
        stock = type(core)._qzoom_stock_class.get_rope_index(core, input_ids, attention_mask=attention_mask,
                                                             **{k: inputs[k] for k in ("image_grid_thw",
                                                                                       "mm_token_type_ids")})[0]
        assert isinstance(core, AlignedRopeMixin)

        @torch.no_grad()
        def logps(position_ids):
            logits = model_(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **inputs).logits[:, :-1] / trainer.temperature
            lp = F.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            return lp[:, -logits_to_keep:]

        lp_aligned, lp_stock = logps(aligned), logps(stock)
        seq_idx = torch.arange(logits_to_keep) + input_ids.shape[1] - logits_to_keep
        post = torch.zeros(input_ids.shape[0], logits_to_keep, dtype=torch.bool)
        for b in range(input_ids.shape[0]):
            runs = image_runs(input_ids[b], img_id)
            if len(runs) >= 2:
                post[b] = attention_mask[b, -logits_to_keep:].bool() & (seq_idx >= runs[1][1])
        if post.any():
            lp = res[0].detach()
            probes.append({"crops": n_crops, "post_tokens": int(post.sum()),
                           "aligned": (lp - lp_aligned).abs()[post].max().item(),
                           "stock": (lp - lp_stock).abs()[post].max().item()})
        return res

    trainer._get_per_token_logps_and_entropies = probe
    trainer.train()
    assert trainer.state.global_step == 2
    stats = aligned_stats(trainer.model)
    assert probes and stats["aligned"] > 0 and stats["ignored"] == 0, (probes, stats)
    err, gap = max(p["aligned"] for p in probes), min(p["stock"] for p in probes)
    print(f"trainer log-probs after zoom crops ({sum(p['post_tokens'] for p in probes)} tokens, "
          f"{sum(p['crops'] for p in probes)} crops): vs explicit aligned ids {err:.3g}, vs ordinary image {gap:.3g}")
    assert err <= 1e-4 and gap > 1e-4


def test_full_ft_reference_model_gets_the_seam_deepeyes_env(tmp_path):
    """Full FT + beta > 0: TRL rebuilds the reference as the stock class; build_trainer installs the seam on it.
    Also runs the DeepEyes environment (scripted `image_zoom_in_tool` calls) for one step."""
    from qzoom_agent.aligned_positions import AlignedRopeMixin, find_cores, is_aligned
    from rl.env import DeepEyesEnv
    from rl.train_grpo import build_trainer

    script_args, training_args, model_args = parse(
        ["--config", str(SMOKE), "--output_dir", str(tmp_path), "--use_peft", "false", "--beta", "0.04",
         "--environment", "deepeyes", "--max_steps", "1", "--save_policy", "false"])
    trainer, run = build_trainer(script_args, training_args, model_args)
    assert trainer.ref_model is not None and is_aligned(trainer.ref_model) and is_aligned(trainer.model)
    assert isinstance(find_cores(trainer.ref_model)[0], AlignedRopeMixin)
    assert run.env_factory.env_class is DeepEyesEnv and [t.__name__ for t in trainer.tools] == ["image_zoom_in_tool"]
    hf = run.qzoom.base
    assert not any(p.requires_grad for p in hf.model.visual.parameters())
    assert not any(p.requires_grad for p in run.qzoom.backbone.layers[0].parameters())  # proposer input frozen
    assert any(p.requires_grad for p in run.qzoom.backbone.layers[-1].parameters())
    trainer.train()
    assert trainer.state.global_step == 1 and run.stats.batches and run.stats.batches[0]["calls_per_item"] > 0


def test_time_limit_stops_with_a_checkpoint_and_resume_finds_it(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from rl import callbacks as cb
    from rl.train_grpo import resume_checkpoint

    with pytest.raises(ValueError, match="minutes > 0"):
        cb.TimeLimitCallback(0)
    clock = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    limit, state, control = cb.TimeLimitCallback(2.0), TrainerState(), TrainerControl()
    limit.on_train_begin(None, state, control)
    state.global_step = 3
    clock[0] += 119
    limit.on_step_end(None, state, control)
    assert not control.should_training_stop and limit.stopped_at is None
    clock[0] += 2
    limit.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_save and limit.stopped_at == 3

    _, args, _ = parse(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"),
                        "--resume_from_checkpoint", "last"])
    assert resume_checkpoint(args) is None                      # nothing yet: the same command starts the run
    for step in (2, 10):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    assert resume_checkpoint(args) == str(tmp_path / "run" / "checkpoint-10")
    args.resume_from_checkpoint = str(tmp_path / "nowhere")
    from qzoom_agent.errors import QZoomError

    with pytest.raises(QZoomError, match="no such checkpoint"):
        resume_checkpoint(args)


def test_testbed_policy_is_the_testbed_with_its_trained_heads():
    from qzoom_agent.testbed import QZOOM_DIR
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy

    if not (QZOOM_DIR / "qzoom_config.json").exists():
        pytest.fail("the shipped Q-Zoom testbed is missing")
    qzoom = load_policy(PolicyConfig(model_name_or_path="testbed"), ScriptArguments(budget_tokens=576), "unused")
    assert qzoom.roi_head is not None and qzoom.gate_head is not None
    assert qzoom.config.max_visual_tokens == 576
