"""Fast paths equal the plain ones: grouped ViT attention vs transformers' per-chunk loop, static-cache decoding
vs the engine's plain greedy loop (CPU, fp32), and on a GPU the CUDA-graph / compiled decode step."""

import pytest
import torch

from conftest import make_qzoom
from qzoom_agent.backbones.base import cat_images
from qzoom_agent.backbones.fast_vision import (fast_vision_installed, install_fast_vision, plan_chunks,
                                               uninstall_fast_vision, vision_attention_modules)
from qzoom_agent.fast_decode import FastDecoder, disable_fast_paths, enable_fast_paths

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
Q = "What is the code on the red tag?"
# (t, h, w) patch grids per call: square, non-square, partial Qwen2.5 windows (18×34 patches = 9×17 cells,
# windows of 4×4 cells), several images of equal and of unequal size in one call.
GRIDS = [[(1, 16, 16)], [(1, 16, 24)], [(1, 18, 34)], [(1, 34, 18), (1, 16, 16), (1, 16, 16)],
         [(1, 16, 24), (1, 16, 24), (1, 16, 24)]]


def test_plan_groups_chunks_by_length_worked_example():
    # 476×336 px Qwen2.5 image: 17×12 cells → 4×3 = 12 full windows of 64 patches, then 3 edge windows of 16
    cu = torch.tensor([0] + [64 * (i + 1) for i in range(12)] + [768 + 16 * (i + 1) for i in range(3)])
    plan = plan_chunks(cu)
    assert [(g.length, g.count, g.start, g.index is None) for g in plan] == [(64, 12, 0, True), (16, 3, 768, True)]
    # interleaved lengths are gathered by an index; empty chunks are dropped
    plan = plan_chunks(torch.tensor([0, 4, 6, 10, 10, 12]))
    assert [(g.length, g.count) for g in plan] == [(4, 2), (2, 2)]
    assert plan[0].index.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert plan[1].index.tolist() == [[4, 5], [10, 11]]


def _vision(hf, grids, seed=0):
    ps = hf.config.vision_config.patch_size
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * ps * ps, generator=g)
    with torch.no_grad():
        out = hf.model.get_image_features(pv, grid, return_dict=True)
    ds = getattr(out, "deepstack_features", None)    # per-image tuples (transformers 5.23) or tensors (5.17)
    return cat_images(out.pooler_output), (torch.cat([cat_images(d) for d in ds]) if ds else None)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_vision_matches_stock_loop(tiny_models, family, attn, monkeypatch):
    hf, _ = tiny_models[family]
    impl = hf.config.vision_config._attn_implementation
    monkeypatch.setattr(hf.config.vision_config, "_attn_implementation", attn)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    try:
        for i, grids in enumerate(GRIDS):
            ref, ref_ds = _vision(hf, grids, seed=i)
            assert install_fast_vision(hf) == hf.config.vision_config.depth
            calls.clear()
            out, out_ds = _vision(hf, grids, seed=i)
            n_fast = len(calls)
            uninstall_fast_vision(hf)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if ref_ds is not None:
                torch.testing.assert_close(out_ds, ref_ds, atol=1e-5, rtol=1e-5)
            # one call per distinct chunk length per block: windows come in ≤ 4 lengths (full, right edge,
            # bottom edge, corner) per image size, full attention in one length per image size
            vc = hf.config.vision_config
            n_full = len(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth))
            sizes = len({g[1:] for g in grids})
            assert n_fast <= 4 * sizes * (vc.depth - n_full) + sizes * n_full
    finally:
        hf.config.vision_config._attn_implementation = impl
    assert not fast_vision_installed(hf)
    assert all(type(m).__name__.startswith("Qwen") for m in vision_attention_modules(hf))


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_vision_through_the_engine(tiny_models, family, rng_image):
    model = make_qzoom(tiny_models, family)
    img = rng_image(330, 210, seed=2)
    keys = set(model.base.state_dict())
    ref = model.answer(img, Q, return_logits=True)
    install_fast_vision(model.base)
    try:
        assert set(model.base.state_dict()) == keys
        out = model.answer(img, Q, return_logits=True)
    finally:
        uninstall_fast_vision(model.base)
    assert out.boxes == ref.boxes and out.text == ref.text
    torch.testing.assert_close(out.first_logits, ref.first_logits, atol=1e-5, rtol=1e-5)


class _LogitsLog:
    """Records every LM-head output (the plain loop's and the fast step's)."""

    def __init__(self, backbone):
        self.bb, self.orig, self.rows = backbone, backbone.logits, []

    def __enter__(self):
        def logits(h):
            out = self.orig(h)
            self.rows.append(out[:, -1].detach().float().clone())
            return out
        self.bb.logits = logits
        return self

    def __exit__(self, *exc):
        del self.bb.logits


def _routed_model(tiny_models, family, images, questions):
    """A model whose gate sends the lowest-p sample direct and the others through the RoI path."""
    model = make_qzoom(tiny_models, family, max_new_tokens=7)
    torch.manual_seed(0)
    with torch.no_grad():
        model.gate_head.head.weight.normal_(0, 0.5)
    probs = sorted(model.answer(i, q, max_new_tokens=1).gate_prob for i, q in zip(images, questions))
    model.config.gate_thresh = (probs[0] + probs[1]) / 2
    return model


def _answers_and_logits(model, images, questions, mode, decoder):
    model.fast_decoder = decoder
    try:
        with _LogitsLog(model.backbone) as log:
            out = model.answer(images, questions, mode=mode, return_logits=True)
    finally:
        model.fast_decoder = None
    return out, log.rows


def _per_row(logs, steps):
    """Logged LM-head rows → (rows, steps, vocab): each decode call logs `steps` (R_g, vocab) entries."""
    return torch.cat([torch.stack(logs[i:i + steps], dim=1) for i in range(0, len(logs), steps)])


@pytest.mark.parametrize("batch,merge", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("mode", ["base", "qzoom"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_matches_plain_loop(tiny_models, family, mode, batch, merge, rng_image, monkeypatch):
    """Same tokens and per-step logits; with merge, direct and zoomed rows decode as one left-padded batch."""
    images = [rng_image(300, 200, seed=1), rng_image(200, 260, seed=2), rng_image(360, 180, seed=3)][:batch]
    questions = [Q, "What color is the large circle?", "Is the square on the left?"][:batch]
    model = _routed_model(tiny_models, family, images, questions) if batch > 1 else \
        make_qzoom(tiny_models, family, max_new_tokens=7)
    monkeypatch.setattr(model.backbone, "eos_ids", [10 ** 6])      # no EOS: every step is compared
    plain, plain_logits = _answers_and_logits(model, images, questions, mode, None)
    decoder = FastDecoder(model.backbone, "static", bucket=32, check_every=3, merge_groups=merge)
    fast, fast_logits = _answers_and_logits(model, images, questions, mode, decoder)
    if mode == "qzoom" and batch == 3:
        assert sorted(a.zoomed for a in plain) == [False, True, True]        # per-sample routing
        assert len(plain_logits) == 14 and len(fast_logits) == (7 if merge else 14)
    elif mode == "qzoom":
        assert plain[0].zoomed
    torch.testing.assert_close(_per_row(fast_logits, 7), _per_row(plain_logits, 7), atol=1e-5, rtol=1e-5)
    for p, f in zip(plain, fast):
        assert (p.text, p.new_tokens, p.zoomed, p.boxes) == (f.text, f.new_tokens, f.zoomed, f.boxes)
        torch.testing.assert_close(f.first_logits, p.first_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_stops_at_eos_like_plain_loop(tiny_models, family, rng_image, monkeypatch):
    images = [rng_image(300, 200, seed=1), rng_image(200, 260, seed=2), rng_image(360, 180, seed=3)]
    questions = [Q] * 3
    model = make_qzoom(tiny_models, family, max_new_tokens=9)
    monkeypatch.setattr(model.backbone, "eos_ids", [10 ** 6])
    with _LogitsLog(model.backbone) as log:
        model.answer(images, questions, mode="base")
    # make the token row 0 emits at its 3rd step an EOS: row 0 stops there, the others at their own first hit
    monkeypatch.setattr(model.backbone, "eos_ids", [int(log.rows[2][0].argmax())])
    plain = model.answer(images, questions, mode="base")
    model.fast_decoder = FastDecoder(model.backbone, "static", check_every=4)
    fast = model.answer(images, questions, mode="base")
    model.fast_decoder = None
    assert [(a.text, a.new_tokens) for a in fast] == [(a.text, a.new_tokens) for a in plain]
    assert plain[0].new_tokens < 9


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_traces_as_one_graph_without_host_sync(tiny_models, family, rng_image, monkeypatch):
    """CPU proxy for CUDA-graph capture: dynamo traces the whole step with fullgraph=True (a host read such as
    .item() or a data-dependent branch would break the graph), and the traced step decodes the same tokens."""
    model = make_qzoom(tiny_models, family, max_new_tokens=5)
    monkeypatch.setattr(model.backbone, "eos_ids", [10 ** 6])
    images, questions = [rng_image(300, 200, seed=1), rng_image(200, 260, seed=2)], [Q, Q]
    plain, plain_logits = _answers_and_logits(model, images, questions, "qzoom", None)
    dec = FastDecoder(model.backbone, "static")
    dec._step = torch.compile(dec._step, backend="eager", fullgraph=True)
    traced, traced_logits = _answers_and_logits(model, images, questions, "qzoom", dec)
    assert [a.text for a in traced] == [a.text for a in plain]
    for p, f in zip(plain_logits[1:], traced_logits[1:]):
        torch.testing.assert_close(f, p, atol=1e-5, rtol=1e-5)


def test_enable_and_disable_fast_paths(tiny_models):
    model = make_qzoom(tiny_models, "qwen2_5_vl")
    enable_fast_paths(model)
    assert fast_vision_installed(model.base) and model.fast_decoder.mode == "static"
    disable_fast_paths(model)
    assert not fast_vision_installed(model.base) and model.fast_decoder is None
    with pytest.raises(Exception, match="needs a CUDA model"):
        FastDecoder(model.backbone, "graph")


def test_packed_gqa_attention_equals_sdpa_with_repeated_kv():
    """One query token per row, 12 query heads over 4 KV heads, padded additive mask: equals transformers' sdpa
    (which repeats K/V); prefill shapes are handed to sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qzoom_agent.fast_decode import packed_gqa_attention, packed_gqa_sdpa_attention

    g = torch.Generator().manual_seed(0)
    B, H, KV, L, D = 2, 12, 4, 40, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // KV, True
    k, v = torch.randn(B, KV, L, D, generator=g), torch.randn(B, KV, L, D, generator=g)
    mask = torch.zeros(B, 1, 1, L)
    mask[0, ..., :5] = torch.finfo(torch.float32).min                       # left padding of row 0
    mask[:, ..., 33:] = torch.finfo(torch.float32).min                      # columns not yet written
    q = torch.randn(B, H, 1, D, generator=g)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    for fn in (packed_gqa_attention, packed_gqa_sdpa_attention):
        out, _ = fn(module, q, k, v, mask, scaling=D ** -0.5)
        assert out.shape == ref.shape == (B, 1, H, D)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    q5 = torch.randn(B, H, 5, D, generator=g)
    mask5 = torch.zeros(B, 1, 5, L)
    torch.testing.assert_close(packed_gqa_attention(module, q5, k, v, mask5, scaling=0.25)[0],
                               sdpa_attention_forward(module, q5, k, v, mask5, scaling=0.25)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_use_packed_gqa_on_sdpa_models(family, monkeypatch):
    """On an sdpa model every decode step goes through packed_gqa_attention (counted), the answers and per-step
    logits equal the plain loop's, and the model's attention setting is restored afterwards."""
    import qzoom_agent.fast_decode as fd
    from eval.bench_latency import make_images

    model, probes = _bench_model(family, "cpu")
    calls = []
    real = fd.packed_gqa_attention
    monkeypatch.setattr(fd, "packed_gqa_attention", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    images = make_images(2, model.backbone.cell_px * 16)

    def run(decoder):
        model.fast_decoder = decoder
        try:
            with _LogitsLog(model.backbone) as log:
                out = probes.run(images, "qzoom", 64, [True, False])["answers"]
        finally:
            model.fast_decoder = None
        return out, log.rows

    plain, plain_logits = run(None)
    packed, packed_logits = run(FastDecoder(model.backbone, "static", merge_groups=False))
    L = model.backbone.num_layers
    assert len(calls) == 2 * 6 * L and all(s[2] == 1 for s in calls)      # 2 groups × 6 steps × layers, q_len 1
    assert model.backbone.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert [a.text for a in packed] == [a.text for a in plain]
    torch.testing.assert_close(_per_row(packed_logits, 7), _per_row(plain_logits, 7), atol=1e-5, rtol=1e-5)


def _bench_model(family, device, dtype="float32"):
    """A tiny model built the way eval/bench_latency.py builds the real shapes (no trl needed: the GPU image
    lacks it), with its forced-routing probes; no EOS, so every step is compared."""
    from eval.bench_latency import LatencyArgs, Probes, build_model

    args = LatencyArgs(dtype=dtype, min_tokens=16, source_tokens=256, new_tokens=7)
    model = build_model("tiny_" + family, args, torch.device(device))
    return model, Probes(model, args)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_mode", ["graph", "compile"])
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_decode_matches_plain_loop_on_gpu(family, decode_mode):
    from eval.bench_latency import make_images

    model, probes = _bench_model(family, "cuda")
    images = make_images(3, model.backbone.cell_px * 16)

    def run(decoder):
        model.fast_decoder = decoder
        try:
            with _LogitsLog(model.backbone) as log:
                out = probes.run(images, "qzoom", 64, [True, False, True])["answers"]
        finally:
            model.fast_decoder = None
        return out, log.rows

    plain, plain_logits = run(None)
    static, static_logits = run(FastDecoder(model.backbone, "static"))
    assert [a.zoomed for a in plain] == [True, False, True]
    torch.testing.assert_close(_per_row(static_logits, 7), _per_row(plain_logits, 7), atol=1e-4, rtol=1e-4)
    dec = FastDecoder(model.backbone, decode_mode)
    for _ in range(2):                                  # the second call replays what the first captured
        out, _ = run(dec)
        assert [a.text for a in out] == [a.text for a in static] == [a.text for a in plain]
        assert all(a.new_tokens == 7 for a in out)
        for a, b in zip(out, plain):
            torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)
    assert decode_mode != "graph" or dec.captures == 1          # direct + zoomed rows merged: one (3, max_len) graph


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_vision_matches_stock_loop_on_gpu(family, dtype):
    model, _ = _bench_model(family, "cuda", dtype)
    hf = model.base
    for i, grids in enumerate(GRIDS):
        ps = hf.config.vision_config.patch_size
        grid = torch.tensor(grids)
        pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * ps * ps, generator=torch.Generator().manual_seed(i))
        pv = pv.to("cuda", getattr(torch, dtype))
        ref, _ = model.backbone._vision_forward(pv, grid)
        install_fast_vision(hf)
        out, _ = model.backbone._vision_forward(pv, grid)
        uninstall_fast_vision(hf)
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        assert err < (1e-5 if dtype == "float32" else 1e-2), (grids, err)


def test_padded_vision_mlp_and_fused_norm_match_stock():
    """Qwen2.5-VL's vision MLP with an inner size that is not a multiple of 64 (3420 in the real model): the padded
    gate+up / down copies give the stock output, follow in-place weight updates, and uninstall restores the class;
    the fused RMSNorm equals the stock one."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLVisionBlock

    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig(hidden_size=48, intermediate_size=100, num_heads=4, hidden_act="silu")
    block = Qwen2_5_VLVisionBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    holder = torch.nn.Module()
    holder.visual = torch.nn.Module()
    holder.visual.block = block
    x = torch.randn(37, 48)
    with torch.no_grad():
        ref_mlp, ref_norm = block.mlp(x), block.norm1(x)
        install_fast_vision(holder)
        assert type(block.mlp).__name__ == "FastQwen2_5_VLMLP" and type(block.norm1).__name__.startswith("Fast")
        torch.testing.assert_close(block.mlp(x), ref_mlp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block.norm1(x), ref_norm, atol=1e-6, rtol=1e-6)
        assert block.mlp._qzoom_pad[0].shape == (2 * 128, 48) and block.mlp._qzoom_pad[2].shape == (48, 128)
        block.mlp.up_proj.weight.mul_(2.0)                       # in-place update: the copies must follow
        fast2 = block.mlp(x)
        uninstall_fast_vision(holder)
        assert type(block.mlp) is Qwen2_5_VLMLP and not hasattr(block.mlp, "_qzoom_pad")
        torch.testing.assert_close(fast2, block.mlp(x), atol=1e-5, rtol=1e-5)
        assert (fast2 - ref_mlp).abs().max() > 1e-3
