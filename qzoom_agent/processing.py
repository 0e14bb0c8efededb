"""Build, save and load Qwen-VL processors offline, with or without torchvision.

transformers 5.x only ships the PIL image processor (`Qwen2VLImageProcessorPil`) when torchvision is
missing, and `Qwen2_5_VLProcessor(...)` / `save_pretrained` / `AutoProcessor.from_pretrained` trip over
the placeholder video processor. We avoid AutoProcessor on that path and assemble the processor from its
parts; with torchvision installed the stock classes are used unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

_PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _allow_missing_video_processor() -> None:
    """Let ProcessorMixin accept and save `video_processor=None` (only needed without torchvision)."""
    from transformers.processing_utils import ProcessorMixin

    if getattr(ProcessorMixin, "_qzoom_none_ok", False):
        return
    check = ProcessorMixin.check_argument_for_proper_class

    def check_argument_for_proper_class(self, name, argument):
        return None if argument is None else check(self, name, argument)

    save = ProcessorMixin.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        cls = type(self)
        missing = [n for n in cls.get_attributes() if getattr(self, n, None) is None]
        if not missing:
            return save(self, *args, **kwargs)
        own = cls.__dict__.get("get_attributes")
        keep = [n for n in cls.get_attributes() if n not in missing]
        cls.get_attributes = classmethod(lambda c: list(keep))
        try:
            return save(self, *args, **kwargs)
        finally:
            if own is not None:
                cls.get_attributes = own
            else:
                del cls.get_attributes

    ProcessorMixin.check_argument_for_proper_class = check_argument_for_proper_class
    ProcessorMixin.save_pretrained = save_pretrained
    ProcessorMixin._qzoom_none_ok = True


def _video_processor(family: str, patch_size: int, merge_size: int):
    if not transformers.utils.is_torchvision_available():
        _allow_missing_video_processor()
        return None
    cls = transformers.Qwen3VLVideoProcessor if family == "qwen3_vl" else transformers.Qwen2VLVideoProcessor
    return cls(patch_size=patch_size, merge_size=merge_size)


def build_processor(tokenizer, family: str = "qwen2_5_vl", *, min_pixels: int | None = None,
                    max_pixels: int | None = None, chat_template: str | None = None):
    """A Qwen-VL processor around `tokenizer`; 14 px patches for Qwen2.5-VL, 16 px for Qwen3-VL (merge 2)."""
    if family not in _PROCESSOR_CLASSES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(_PROCESSOR_CLASSES)}")
    patch = 16 if family == "qwen3_vl" else 14
    cell = patch * 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels or 4 * cell * cell, "longest_edge": max_pixels or 1024 * cell * cell},
    )
    cls = getattr(transformers, _PROCESSOR_CLASSES[family])
    return cls(image_processor=image_processor, tokenizer=tokenizer,
               video_processor=_video_processor(family, patch, 2),
               chat_template=chat_template or tokenizer.chat_template)


def _saved_with_video_processor(path: Path) -> bool:
    """Folders saved where torchvision was missing have no video processor, and AutoProcessor refuses them."""
    if (path / "video_preprocessor_config.json").exists():
        return True
    cfg = path / "processor_config.json"
    return cfg.exists() and bool(json.loads(cfg.read_text()).get("video_processor"))  # saved as null without


def load_processor(path: str | os.PathLike, family: str | None = None):
    """Load a processor saved by `save_pretrained` (ours or a real Qwen release), offline, torchvision optional."""
    path = Path(path)
    if transformers.utils.is_torchvision_available() and _saved_with_video_processor(path):
        return transformers.AutoProcessor.from_pretrained(path)
    # no torchvision, or a folder saved without one (no video processor config: AutoProcessor would refuse it)
    _allow_missing_video_processor()
    cfg_file = path / "processor_config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        ip_cfg = dict(cfg.get("image_processor", {}))
        cls_name = cfg.get("processor_class")
    else:  # older releases: preprocessor_config.json holds the image processor
        ip_cfg = json.loads((path / "preprocessor_config.json").read_text())
        cls_name = ip_cfg.get("processor_class")
    for key in ("image_processor_type", "processor_class", "_processor_class"):
        ip_cfg.pop(key, None)
    image_processor = Qwen2VLImageProcessorPil(**ip_cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if cls_name is None:
        cls_name = _PROCESSOR_CLASSES.get(family or "qwen2_5_vl")
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tokenizer.chat_template
    cls = getattr(transformers, cls_name)
    family = {v: k for k, v in _PROCESSOR_CLASSES.items()}.get(cls_name, family or "qwen2_5_vl")
    video = _video_processor(family, image_processor.patch_size, image_processor.merge_size)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=template)
