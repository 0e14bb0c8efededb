"""The adapters accept both layouts of `get_image_features` output that the supported transformers versions return.

transformers 5.17 (the GPU image) returns Qwen3-VL's `pooler_output` split per image (a tuple) but each
`deepstack_features` level as one (N, d) tensor over all images; 5.23 splits both per image. Whichever version is
installed, these tests build both layouts from one real output and check that the adapter's merge gives the same
(N, d) tensors, so the 5.17 layout is covered on a machine that only has 5.23 (and the reverse).
"""
import pytest
import torch
from PIL import Image

from qzoom_agent.backbones.base import cat_images
from qzoom_agent.backbones.qwen3_vl import vision_features

GRIDS = [(1, 16, 16), (1, 16, 24), (1, 18, 34)]       # three images of unequal size in one call


def _features(hf):
    """One real get_image_features output for GRIDS, plus its per-image token counts."""
    ps = hf.config.vision_config.patch_size
    grid = torch.tensor(GRIDS)
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * ps * ps, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf.model.get_image_features(pv, grid, return_dict=True)
    sizes = [t * (h // 2) * (w // 2) for t, h, w in GRIDS]
    return out, sizes


def _layouts(out, sizes):
    """(5.17 layout, 5.23 layout) of the same features."""
    embeds = cat_images(out.pooler_output)
    levels = [cat_images(lv) for lv in out.deepstack_features]
    v517 = type(out)(pooler_output=torch.split(embeds, sizes), deepstack_features=list(levels))
    v523 = type(out)(pooler_output=torch.split(embeds, sizes),
                     deepstack_features=[torch.split(lv, sizes) for lv in levels])
    return v517, v523


def test_cat_images_takes_a_tensor_or_per_image_pieces():
    x = torch.arange(12.0).view(6, 2)
    assert cat_images(x) is x
    for pieces in (torch.split(x, [1, 2, 3]), list(torch.split(x, [4, 2]))):
        assert torch.equal(cat_images(pieces), x)


def test_qwen3_vision_features_same_for_both_layouts(tiny_models):
    hf, _ = tiny_models["qwen3_vl"]
    out, sizes = _features(hf)
    v517, v523 = _layouts(out, sizes)
    assert isinstance(v517.deepstack_features[0], torch.Tensor) and isinstance(v523.deepstack_features[0], tuple)
    e517, d517 = vision_features(v517)
    e523, d523 = vision_features(v523)
    n = sum(sizes)
    assert e517.shape[0] == n and torch.equal(e517, e523)
    assert len(d517) == len(d523) == len(hf.config.vision_config.deepstack_visual_indexes)
    for a, b in zip(d517, d523):
        assert a.shape == (n, e517.shape[1]) and torch.equal(a, b)


@pytest.mark.parametrize("layout", ["5.17", "5.23"])
def test_qwen3_encode_images_with_either_layout(tiny_models, layout):
    """encode_images through the adapter, with get_image_features returning the given version's layout."""
    from qzoom_agent.backbones import backbone_for

    hf, proc = tiny_models["qwen3_vl"]
    bb = backbone_for(hf, proc)
    images = [Image.new("RGB", (w, h), (40 * i, 90, 200 - 40 * i)) for i, (w, h) in
              enumerate([(320, 320), (480, 320), (352, 608)])]
    ref = bb.encode_images(images, 16, 64)
    stock = hf.model.get_image_features

    def relayout(pixel_values, grid_thw, **kwargs):
        out = stock(pixel_values, grid_thw, **kwargs)
        sizes = [int(t * (h // 2) * (w // 2)) for t, h, w in grid_thw.tolist()]
        return _layouts(out, sizes)[0 if layout == "5.17" else 1]

    hf.model.get_image_features = relayout            # instance attribute over the class method, removed below
    try:
        got = bb.encode_images(images, 16, 64)
    finally:
        del hf.model.get_image_features
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a.grid_hw == b.grid_hw and torch.equal(a.embeds, b.embeds)
        assert len(a.deepstack) == len(b.deepstack) > 0
        for x, y in zip(a.deepstack, b.deepstack):
            assert x.shape == a.embeds.shape and torch.equal(x, y)
