"""Testbed tokenizer, chat template, processor round trip and shipped-weight limits (CPU, fast)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qzoom_agent.testbed.tokenizer import build_testbed_tokenizer, chat_template


@pytest.fixture(scope="module")
def tok():
    return build_testbed_tokenizer()


@pytest.mark.parametrize("code", ["K7Q-42X", "ACDEFHJ", "3456", "KPW-5JM"])
def test_codes_one_char_per_token(tok, code):
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list(code)
    assert tok.decode(ids) == code


def test_words_single_tokens_and_round_trip(tok):
    text = "What is the reference code in the pink box?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split()) + 1          # one token per word, plus "?"
    assert tok.decode(ids) == text
    call = '<tool_call>\n{"name": "zoom", "arguments": {"query": "the red tag", "k": 1}}\n</tool_call>'
    assert tok.decode(tok(call, add_special_tokens=False)["input_ids"]) == call
    for s in ("<|im_start|>", "<|image_pad|>", "<tool_call>", "</tool_response>"):
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_equals_trl():
    trl = pytest.importorskip("trl.chat_template_utils")
    assert chat_template() == trl.qwen3_vl_chat_template


def test_processor_save_reload_identical_ids(tmp_path, tok):
    from qzoom_agent.processing import load_processor
    from qzoom_agent.testbed.model import build_processor_for

    proc = build_processor_for(tok)
    proc.save_pretrained(tmp_path)
    proc2 = load_processor(tmp_path, "qwen2_5_vl")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 280, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the large circle?"}]}]
    outs = []
    for p in (proc, proc2):
        text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        outs.append(p(text=[text], images=[img], return_tensors="pt"))
    assert outs[0]["input_ids"].tolist() == outs[1]["input_ids"].tolist()
    assert np.allclose(outs[0]["pixel_values"].numpy(), outs[1]["pixel_values"].numpy())


def test_seq_builder_matches_chat_template(tok):
    """Training sequences are exactly what the engine's chat template yields for the same prompt."""
    from qzoom_agent.fusion import ImageSlot
    from qzoom_agent.training.testbed_data import SYSTEM, SeqBuilder

    sb = SeqBuilder(tok)
    for system in (False, True):
        s = sb.build([None], [ImageSlot((2, 3))], "What is the letter on the red tag?", "K", system=system)
        msgs = ([{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] if system else []) + [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the letter on the red tag?"}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * 6)
        ref = tok(text, add_special_tokens=False)["input_ids"]
        assert s.ids[:s.n_prompt] == ref
        assert tok.decode(s.ids[s.n_prompt:]) == "K<|im_end|>"


def test_shipped_weights_within_limits():
    w = Path(__file__).resolve().parents[1] / "qzoom_agent" / "testbed" / "weights"
    if not (w / "config.json").exists():
        pytest.skip("no shipped testbed weights")
    shards = sorted(w.glob("*.safetensors"))
    assert shards and all(f.stat().st_size <= 15 * 2**20 for f in shards)
    assert sum(f.stat().st_size for f in w.iterdir()) <= 60 * 2**20
    idx = json.loads((w / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] / 2 <= 30e6          # bf16: 2 bytes a parameter


def test_folder_saved_without_torchvision_loads_where_torchvision_is(tmp_path, tok, monkeypatch):
    """A processor saved on a box without torchvision has no video processor; on a box with torchvision
    `AutoProcessor` refuses such a folder (OSError: video_preprocessor_config.json), which stopped the first GPU RL
    run. `load_processor` must build it itself there, with a video processor, and keep AutoProcessor for complete
    folders."""
    import transformers

    from qzoom_agent import processing
    from qzoom_agent.testbed.model import build_processor_for

    build_processor_for(tok).save_pretrained(tmp_path)
    assert not processing._saved_with_video_processor(tmp_path)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    built = []
    monkeypatch.setattr(processing, "_video_processor", lambda family, patch, merge: built.append((family, patch,
                                                                                                  merge)))

    def refuse(path, *a, **k):
        raise OSError(f"Can't load video processor for '{path}'")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    proc = processing.load_processor(tmp_path, "qwen2_5_vl")
    assert type(proc).__name__ == "Qwen2_5_VLProcessor" and built == [("qwen2_5_vl", 14, 2)]
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    cfg["video_processor"] = {"patch_size": 14}
    (tmp_path / "processor_config.json").write_text(json.dumps(cfg))
    assert processing._saved_with_video_processor(tmp_path)
    with pytest.raises(OSError, match="video processor"):       # a complete folder goes to AutoProcessor
        processing.load_processor(tmp_path, "qwen2_5_vl")
