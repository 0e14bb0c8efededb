"""Importer for official Q-Zoom folders: a synthetic 'official' checkpoint (tiny random base + heads of a second
QZoomModel, renamed exactly as Q-Zoom's modeling files name them) converts into a model that answers identically."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_qzoom
from qzoom_agent import QZoomError, QZoomModel
from qzoom_agent.training.import_official import import_official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
K, T, GATE_T = 1, 2, 2
ROI_THRESH = 0.4                                             # random tiny maps peak at ~0.5-0.6
BUDGET = dict(min_visual_tokens=16, max_visual_tokens=64)
PREFIX = {"qwen2_5_vl": "model.", "qwen3_vl": "model.language_model."}   # 4.51.3 / 4.57.1 layouts


def source_model(tiny_models, family):
    """The QZoomModel whose heads the official folder carries: heads moved away from their layer-copy init."""
    model = make_qzoom(tiny_models, family, twig_K=K, twig_T=T, gate_T=GATE_T, sink_min_cells=256,
                       roi_conf_thresh=ROI_THRESH)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for head in (model.roi_head, model.gate_head):
            for p in head.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.gate_head.head.bias.fill_(2.0)                # the gate fires, so both heads shape the answer
    return model


def official_head_tensors(model, family) -> dict[str, torch.Tensor]:
    """Our heads under the official names, plus the last twig layer's unused tensors (Q-Zoom stores a full layer)."""
    p = PREFIX[family]
    out = {}
    for name, t in model.heads_state_dict().items():
        group, rest = name.split(".", 1)
        if name.startswith("roi.layers."):
            out[f"{p}twig_layers.{rest[len('layers.'):]}"] = t
        elif name.startswith("roi.qk."):
            param = rest[len("qk."):]
            param = param if param.startswith("input_layernorm") else f"self_attn.{param}"
            out[f"{p}twig_layers.{T - 1}.{param}"] = t
        elif name.startswith("gate.layers."):
            out[f"{p}high_res_layers.{rest[len('layers.'):]}"] = t
        else:
            out[f"{p}high_res_head.{rest[len('head.'):]}"] = t
    last = model.backbone.layers[K + T - 1].state_dict()
    for param, t in last.items():
        key = f"{p}twig_layers.{T - 1}.{param}"
        if key not in out:
            out[key] = t + 1.0                               # stored, never used: must be dropped
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def base_tensors(model, family) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone().contiguous() for k, v in model.base.state_dict().items()}
    if family == "qwen3_vl":
        return sd
    legacy = {}                                              # transformers 4.51.3 names, as Q-Zoom saves them
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        legacy[k] = v
    return legacy


def write_official(path: Path, model, family, heads=None, **config_changes) -> Path:
    path.mkdir(parents=True)
    base = base_tensors(model, family)
    heads = official_head_tensors(model, family) if heads is None else heads
    names = sorted(base)
    shard1 = {k: base[k] for k in names[: len(names) // 2]}
    shard2 = {k: base[k] for k in names[len(names) // 2:]}
    for k, v in heads.items():                               # heads spread over both shards, as HF sharding does
        (shard1 if "twig" in k else shard2)[k] = v
    save_file(shard1, str(path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard2, str(path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                                            **{k: "model-00002-of-00002.safetensors" for k in shard2}}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = model.base.config.to_dict()
    if family == "qwen2_5_vl":                               # 4.51.3 configs are flat
        text = cfg.pop("text_config")
        cfg = {**cfg, **{k: v for k, v in text.items() if k not in cfg}}
    cfg.update(enable_twig=True, twig_K=K, twig_T=T, roi_source="qk", roi_loss="bce", roi_super_type="v1",
               roi_multi_head=False, roi_skip_ffn=False, roi_keep_ffn_mod_ratio=1000, enable_high_res=True,
               roi_post_training=False, min_pixels=50176, max_pixels=802816, reuse_src_pos=True,
               add_noise_to_roi=False, high_res_thresh=0.5, roi_conf_thresh=ROI_THRESH)
    cfg.update(config_changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    model.processor.save_pretrained(path)
    model.base.generation_config.save_pretrained(path)
    return path


def first_logits(model, image):
    return model.answer(image, "What is the code on the red tag?", max_new_tokens=3, return_logits=True, **BUDGET)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_import_matches_source_heads_and_answers(tiny_models, rng_image, tmp_path, family):
    src_model = source_model(tiny_models, family)
    official = official_head_tensors(src_model, family)
    src = write_official(tmp_path / "official", src_model, family)
    out = tmp_path / "ours"

    model, report = import_official_checkpoint(src, out, dtype="float32", attn_implementation="eager", **BUDGET)

    p = PREFIX[family]
    assert report.family == family and report.plan.prefix == p
    assert (report.plan.twig_K, report.plan.twig_T, report.plan.gate_T) == (K, T, GATE_T)
    unused = {f"{p}twig_layers.{T - 1}.{n}" for n in ("self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                       "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                                       "mlp.up_proj.weight", "mlp.down_proj.weight")}
    assert unused <= set(report.plan.dropped)
    assert not set(report.plan.dropped) & set(report.plan.mapping)
    cfg = model.config
    assert (cfg.family, cfg.twig_K, cfg.twig_T, cfg.gate_T, cfg.has_gate) == (family, K, T, GATE_T, True)
    assert (cfg.roi_conf_thresh, cfg.gate_thresh, cfg.alignment) == (ROI_THRESH, 0.5, "continuous")

    reloaded = QZoomModel.from_pretrained(out, attn_implementation="eager")   # as the tiny source
    saved_heads = load_file(str(out / "qzoom_heads.safetensors"))
    for official_name, ours in report.plan.mapping.items():
        assert torch.equal(saved_heads[ours], official[official_name]), official_name
    assert set(saved_heads) == set(src_model.heads_state_dict())
    saved_cfg = json.loads((out / "config.json").read_text())
    assert "twig_K" not in saved_cfg and "enable_high_res" not in saved_cfg   # a stock transformers config

    image = rng_image(320, 240, seed=3)
    want = first_logits(src_model, image)
    assert want.zoomed and want.gate_prob > 0.5                 # both heads took part
    for got in (first_logits(model, image), first_logits(reloaded, image)):
        # weights are checked bit-exact above; logits of two loaded copies may differ in the last bits (CPU
        # kernels pick vector paths by memory alignment): 6e-8 seen on the 2-core box
        torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-6, rtol=1e-6)
        assert got.gate_prob == want.gate_prob and got.text == want.text
        assert [b.box for b in got.boxes] == [b.box for b in want.boxes]


def test_cli_with_yaml_config(tiny_models, rng_image, tmp_path):
    family = "qwen2_5_vl"
    src_model = source_model(tiny_models, family)
    src = write_official(tmp_path / "official", src_model, family)
    out = tmp_path / "ours"
    cfg = tmp_path / "import.yaml"
    cfg.write_text(f"src: {src}\nout: {out}\nmin_visual_tokens: 16\nmax_visual_tokens: 64\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "tools/import_qzoom_checkpoint.py"), "--config", str(cfg),
                          "--dtype", "float32", "--family", "qwen2_5_vl"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "K=1, T=2, gate_T=2" in run.stdout and "dropped" in run.stdout
    model = QZoomModel.from_pretrained(out, attn_implementation="eager")
    assert (model.config.min_visual_tokens, model.config.max_visual_tokens) == (16, 64)
    image = rng_image(300, 200, seed=5)
    torch.testing.assert_close(first_logits(model, image).first_logits, first_logits(src_model, image).first_logits,
                               atol=1e-6, rtol=1e-6)


def _bad_official(tiny_models, tmp_path, family="qwen2_5_vl", edit_heads=None, **config_changes):
    m = source_model(tiny_models, family)
    heads = official_head_tensors(m, family)
    if edit_heads is not None:
        heads = edit_heads(heads)
    return write_official(tmp_path / "official", m, family, heads=heads, **config_changes)


def _drop_twig(heads):
    return {k: v for k, v in heads.items() if "twig_layers" not in k}


def _shrink_q(heads):
    heads = dict(heads)
    heads["model.twig_layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    return heads


@pytest.mark.parametrize("edit, changes, message", [
    (_drop_twig, {}, "no twig tensors found"),
    (None, {"twig_T": 3}, "stores 2 twig layers but config.json says twig_T=3"),
    (_shrink_q, {}, "do not match the base model's shapes"),
    (None, {"high_res_T": 3}, "stores 2 high_res_layers"),
    (None, {"high_res_K": 2}, "high_res_K=2 differs from twig_K=1"),
    (None, {"roi_source": "hidden_states"}, "only the released 'qk' twig"),
    (None, {"model_type": "llava"}, "not a supported Q-Zoom base"),
])
def test_bad_checkpoints_raise_clear_errors(tiny_models, tmp_path, edit, changes, message):
    src = _bad_official(tiny_models, tmp_path, edit_heads=edit, **changes)
    out = tmp_path / "ours"
    with pytest.raises(QZoomError, match=message):
        import_official_checkpoint(src, out, dtype="float32", **BUDGET)
    assert not out.exists()


def test_family_mismatch_and_cli_error_exit(tiny_models, tmp_path, capsys):
    from tools.import_qzoom_checkpoint import main

    src = _bad_official(tiny_models, tmp_path)
    with pytest.raises(QZoomError, match="--family qwen3_vl"):
        import_official_checkpoint(src, family="qwen3_vl")
    assert main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "source folder not found" in capsys.readouterr().err


def test_pruned_checkpoint_needs_fill_from(tiny_models, rng_image, tmp_path):
    """SD-RPN checkpoints saved with layers[K:] pruned: a clear error, or refilled from the original base."""
    family = "qwen2_5_vl"
    m = source_model(tiny_models, family)
    full = write_official(tmp_path / "full", m, family)
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for f in full.iterdir():
        if f.suffix == ".safetensors":
            sd = {k: v for k, v in load_file(str(f)).items() if not k.startswith(("model.layers.2.", "model.layers.3."))}
            save_file(sd, str(pruned / f.name))
        else:
            (pruned / f.name).write_bytes(f.read_bytes())
    with pytest.raises(QZoomError, match="base tensors are missing"):
        import_official_checkpoint(pruned, dtype="float32", **BUDGET)
    base_dir = tmp_path / "base"
    m.base.save_pretrained(base_dir)                          # 5.x layout: names are matched across layouts
    model, report = import_official_checkpoint(pruned, dtype="float32", fill_from=base_dir,
                                               attn_implementation="eager", **BUDGET)
    assert len(report.filled_from) == 2 * len(m.backbone.layers[0].state_dict())
    image = rng_image(300, 200, seed=1)
    torch.testing.assert_close(first_logits(model, image).first_logits, first_logits(m, image).first_logits,
                               atol=1e-6, rtol=1e-6)
