"""The testbed model: a from-scratch `Qwen2_5_VLForConditionalGeneration` (~26 M parameters) and its processor.

Every ViT block uses full attention (windowing buys nothing at ≤ 2304 tokens, evaluation.md §5.1), so the stock HF
forward and our batched training forward see the same function. Weights ship as bf16 safetensors shards ≤ 15 MiB.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The shipped folders, or copies elsewhere (env QZOOM_TESTBED_WEIGHTS / QZOOM_TESTBED_QZOOM: a device copy of the
# checkout that must not carry 100 MiB of weights on every call, a read-only install with the weights unpacked apart)
WEIGHTS_DIR = Path(os.environ.get("QZOOM_TESTBED_WEIGHTS") or Path(__file__).with_name("weights"))
# the testbed after Q-Zoom's three stages (tools/train_qzoom_heads.py)
QZOOM_DIR = Path(os.environ.get("QZOOM_TESTBED_QZOOM") or Path(__file__).with_name("qzoom"))
CELL = 28


@dataclass
class TestbedArch:
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    ffn: int = 1024
    vit_hidden: int = 384
    vit_depth: int = 6
    vit_heads: int = 6
    vit_ffn: int = 1152
    rope_theta: float = 10000.0
    tie_embeddings: bool = False


def testbed_config(tok, arch: TestbedArch | None = None, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    a = arch or TestbedArch()
    ids = {s: tok.convert_tokens_to_ids(s) for s in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    vocab = ((len(tok) + 63) // 64) * 64
    head_dim = a.hidden // a.heads
    half = head_dim // 2
    sec = [half // 4, (half - half // 4) // 2]
    sec.append(half - sum(sec))            # 64-dim heads -> [8, 12, 12], as Qwen2.5-VL
    text = dict(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=8192,
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta, "mrope_section": sec},
                tie_word_embeddings=a.tie_embeddings)
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=a.vit_depth, hidden_size=a.vit_hidden, intermediate_size=a.vit_ffn,
                           num_heads=a.vit_heads, out_hidden_size=a.hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=list(range(a.vit_depth))),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=a.tie_embeddings)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def build_processor_for(tok):
    from ..processing import build_processor

    # 4 … 4096 merged tokens; callers pick the budget per image (min_pixels/max_pixels or a pre-resize)
    return build_processor(tok, "qwen2_5_vl", min_pixels=4 * CELL * CELL, max_pixels=4096 * CELL * CELL)


def build_testbed(seed: int = 0, arch: TestbedArch | None = None, attn: str = "sdpa", tok=None):
    """(hf_model, processor) with random weights: the starting point of training."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tokenizer import build_testbed_tokenizer

    tok = tok or build_testbed_tokenizer()
    cfg = testbed_config(tok, arch, attn)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"),
                                            tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.do_sample = False
    return model, build_processor_for(tok)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_testbed(model, processor, path: str | os.PathLike, *, shard_mib: int = 15, meta: dict | None = None) -> Path:
    """Write bf16 safetensors shards (≤ `shard_mib` MiB) + config + processor, atomically (tmp dir, then rename)."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16)
    try:
        model.save_pretrained(tmp, max_shard_size=int(shard_mib * 1024 * 1024 - 256 * 1024), safe_serialization=True)
    finally:
        model.to(dtype)
    processor.save_pretrained(tmp)
    if meta is not None:
        (tmp / "testbed_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_testbed_hf(path: str | os.PathLike | None = None, *, dtype=torch.float32, attn: str = "sdpa",
                    device: str = "cpu"):
    """(hf_model, processor) of a saved testbed folder (default: the shipped weights), offline, no torchvision."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..processing import load_processor

    path = Path(path or WEIGHTS_DIR)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no testbed weights in {path} (train them with tools/train_testbed.py)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    processor = load_processor(path, "qwen2_5_vl")
    return model, processor


def testbed_qzoom_config(path: str | os.PathLike | None = None):
    """The QZoomConfig that suits the testbed (6 layers; twig at the middle; the testbed's budgets)."""
    from ..config import QZoomConfig

    path = Path(path or WEIGHTS_DIR)
    meta_file = path / "testbed_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    n_layers = meta.get("arch", {}).get("layers", TestbedArch().layers)
    # min_box_px 168: the testbed learned to read crops with context (side 4x the target box, like its oracle
    # crops); 28-px tight boxes magnified ~15x left it at 56 / 38 % on dev attr-cue / fsp-4k oracle crops, 168 px
    # gives 94 / 100 % (eval/results/qzoom_heads_testbed.md)
    kw = dict(family="qwen2_5_vl", twig_K=n_layers // 2, twig_T=2, gate_T=2, has_roi_head=False, has_gate=False,
              min_visual_tokens=256, max_visual_tokens=2304, system_prompt=None, min_box_px=168)
    kw.update(meta.get("qzoom_config", {}))
    try:
        return QZoomConfig(**kw)
    except TypeError:  # an older/newer QZoomConfig without some field
        import inspect

        ok = set(inspect.signature(QZoomConfig).parameters)
        return QZoomConfig(**{k: v for k, v in kw.items() if k in ok})


def load_testbed(path: str | os.PathLike | None = None, *, device: str = "cpu", dtype=torch.float32):
    """The shipped testbed as a `QZoomModel` (engine), or `(hf_model, processor)` if the engine is unavailable."""
    model, processor = load_testbed_hf(path, dtype=dtype, device=device)
    try:
        from ..engine import QZoomModel
    except ImportError:
        return model, processor
    return QZoomModel.from_backbone(model, processor, testbed_qzoom_config(path))


def load_testbed_qzoom(path: str | os.PathLike | None = None, *, device: str = "cpu", dtype=torch.float32):
    """The shipped testbed with its trained Q-Zoom heads (RoI head + gate; backbone after targeted SFT) as a
    `QZoomModel`: the output of `tools/train_qzoom_heads.py` (eval/results/qzoom_heads_testbed.md)."""
    from ..engine import QZoomModel

    path = Path(path or QZOOM_DIR)
    if not (path / "qzoom_config.json").exists():
        raise FileNotFoundError(f"no trained Q-Zoom testbed in {path} (train it with tools/train_qzoom_heads.py)")
    return QZoomModel.from_pretrained(path, device=device, dtype=dtype)


def arch_dict(arch: TestbedArch | None = None) -> dict:
    return asdict(arch or TestbedArch())
