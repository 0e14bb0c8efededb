"""CPU smoke of the testbed training step: explicit 3-D M-RoPE ids, patchify parity, checkpoint resume."""
import numpy as np
import pytest
import torch

from qzoom_agent.testbed.model import TestbedArch, build_testbed, load_testbed_hf, save_testbed
from qzoom_agent.training.testbed_data import SeqBuilder, make_views
from qzoom_agent.training.testbed_model import (check_positions, collate, lm_forward, patchify, qa_loss)

TINY = TestbedArch(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vit_hidden=32, vit_depth=2, vit_heads=2,
                   vit_ffn=64)


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_testbed(seed=0, arch=TINY)
    return model, proc


def _batch(proc, model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    sb = SeqBuilder(proc.tokenizer)
    seqs = []
    for i in range(n):
        canvas = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
        images, slots, _ = make_views(rng, canvas, (200, 100, 230, 130), "crop" if i % 2 else "coarse",
                                      budget=64, crop_max=64)
        seqs.append(sb.build(images, slots, "What is the letter on the red tag?", "K", system=bool(i % 2)))
    tok = proc.tokenizer
    return collate(seqs, tok.convert_tokens_to_ids("<|endoftext|>"), model.config.image_token_id, "cpu")


def test_patchify_matches_processor(tiny):
    _, proc = tiny
    img = np.random.default_rng(1).integers(0, 255, (112, 168, 3), dtype=np.uint8)
    from PIL import Image

    ref = proc.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    ours = patchify(torch.from_numpy(img))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_two_step_smoke_uses_3d_positions(tiny):
    model, proc = tiny
    model.train()
    ids, mask, pos, labels, images = _batch(proc, model)
    assert pos.shape[0] == 3 and pos.dim() == 3
    img = ids == model.config.image_token_id
    assert not torch.equal(pos[1][img], pos[2][img])          # h and w axes differ on image rows
    seen = []
    rot = model.model.language_model.rotary_emb
    hook = rot.register_forward_hook(lambda m, a, kw_out: seen.append(a[1].detach().clone()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ims = [torch.from_numpy(np.ascontiguousarray(i)) for i in images]
    losses = []
    try:
        for _ in range(2):
            h, _, _ = lm_forward(model, ids, mask, pos, ims)
            loss, _ = qa_loss(model, h, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    finally:
        hook.remove()
    assert all(np.isfinite(losses))
    assert seen and seen[0].shape[0] == 3 and torch.equal(seen[0], pos)   # the LM got our 3-D ids
    with pytest.raises(AssertionError):                                     # 1-D ids are refused
        check_positions(pos[:1].expand(3, -1, -1).clone(), ids, model.config.image_token_id)


def test_checkpoint_resume_equality(tiny, tmp_path):
    model, proc = tiny
    model.eval()
    ids, mask, pos, _, images = _batch(proc, model, seed=3)
    ims = [torch.from_numpy(np.ascontiguousarray(i)) for i in images]
    save_testbed(model, proc, tmp_path / "ck", meta={"arch": {"layers": 2}})
    m2, _ = load_testbed_hf(tmp_path / "ck")
    ref = model.to(torch.bfloat16).to(torch.float32)                      # the checkpoint stores bf16
    with torch.no_grad():
        a, _, _ = lm_forward(ref, ids, mask, pos, ims)
        b, _, _ = lm_forward(m2, ids, mask, pos, ims)
    assert (a - b).abs().max() < 2e-3                                     # bf16 round trip, fp32 compute
    assert not (tmp_path / "ck.tmp").exists()                             # atomic write left no temp dir


def test_attn_rows_match_eager_attention(tiny):
    """The recomputed attention rows (used to supervise a head under sdpa) equal the eager attentions."""
    from qzoom_agent.training.testbed_model import LayerInputTap, attn_rows

    model, proc = tiny
    model.eval()
    ids, mask, pos, _, images = _batch(proc, model, seed=5)
    mask[0, -3:] = 0                                                       # some right padding
    ims = [torch.from_numpy(np.ascontiguousarray(i)) for i in images]
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    taps = [LayerInputTap(model, l) for l in range(model.config.text_config.num_hidden_layers)]
    try:
        with torch.no_grad():
            _, _, att = lm_forward(model, ids, mask, pos, ims, output_attentions=True)
            q_idx = mask.sum(1) - 1
            for l, tap in enumerate(taps):
                ours = attn_rows(model, l, tap.out, pos, mask, q_idx)
                ref = att[l][torch.arange(ids.shape[0]), :, q_idx]
                assert torch.allclose(ours, ref.float(), atol=1e-4), (l, (ours - ref).abs().max())
    finally:
        for t in taps:
            t.remove()
        model.set_attn_implementation(prev)


def test_shared_vision_repeats_group_rows(tiny):
    """Prompts of one rendered item share one ViT pass; rows come back in sequence order."""
    from qzoom_agent.training.testbed_data import SeqBuilder, make_views
    from qzoom_agent.training.testbed_model import shared_vision, vision

    model, proc = tiny
    rng = np.random.default_rng(2)
    sb = SeqBuilder(proc.tokenizer)
    seqs = []
    for g in range(2):
        canvas = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
        images, slots, _ = make_views(rng, canvas, (200, 100, 230, 130), "crop", budget=64, crop_max=64)
        for k in range(2):
            s = sb.build(images, slots, "What is the letter on the red tag?", "K", system=False)
            s.meta = dict(group=g)
            seqs.append(s)
    with torch.no_grad():
        z = shared_vision(model, seqs, "cpu")
        ref = vision(model, [torch.from_numpy(np.ascontiguousarray(im)) for s in seqs for im in s.images])
    assert z.shape == ref.shape and torch.allclose(z, ref, atol=1e-5)


def test_mc_permuted_option_spans_and_gold(tiny):
    """Stage-4 MC prompts: options re-ordered with the letter following the answer text; option-line spans found."""
    from qzoom_agent.fusion import ImageSlot
    from qzoom_agent.training.testbed_data import SeqBuilder
    from qzoom_agent.training.testbed_streams import mc_permuted

    _, proc = tiny
    sb = SeqBuilder(proc.tokenizer)
    item = dict(question="What is the letter on the red tag?", options=["K", "T", "M", "W"], answer="C", schema="vstar")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        prompt, letter = mc_permuted(rng, item, "M")
        s = sb.build([None], [ImageSlot((2, 2))], prompt, letter, system=False)
        spans = sb.option_spans(s, 4)
        lines = [proc.tokenizer.decode(s.ids[a:b]) for a, b in spans]
        assert lines[0].startswith("A. ") and lines[3].startswith("D. ") and all(x.endswith("\n") for x in lines)
        assert lines["ABCD".index(letter)].strip().endswith("M")
        seen.add(letter)
    assert len(seen) > 1                                                       # the letter moves


def test_cached_greedy_answer_equals_recompute(tiny):
    """The eval's KV-cached greedy decoding gives the same tokens as re-running the prefix every step, on a
    right-padded batch of unequal prompts (coarse-only and global + crop rows), with and without an EOS hit."""
    from qzoom_agent.training.testbed_model import greedy_answer

    model, proc = tiny
    model.eval()
    rng = np.random.default_rng(3)
    sb = SeqBuilder(proc.tokenizer)
    seqs = []
    for i in range(3):
        canvas = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
        images, slots, _ = make_views(rng, canvas, (200, 100, 230, 130), "crop" if i % 2 else "coarse",
                                      budget=64, crop_max=64)
        seqs.append(sb.build(images, slots, "What is the letter on the red tag?" + " please" * i, None,
                             system=bool(i % 2)))
    tok = proc.tokenizer
    ids, mask, pos, _, images = collate(seqs, tok.convert_tokens_to_ids("<|endoftext|>"),
                                        model.config.image_token_id, "cpu")
    images = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
    n_prompt = [s.n_prompt for s in seqs]
    assert len(set(n_prompt)) == 3
    ref_logits, got_logits = [], []
    ref = greedy_answer(model, ids, mask, pos, images, n_prompt, max_new=6, use_cache=False, record=ref_logits)
    got = greedy_answer(model, ids, mask, pos, images, n_prompt, max_new=6, record=got_logits)
    assert got == ref and all(len(r) == 6 for r in ref)
    assert len(got_logits) == len(ref_logits) == 6
    for g, r in zip(got_logits, ref_logits):                  # positions and masks of every step, not just argmax
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    eos = ref[1][2]                                   # a token row 1 emits at step 3: it stops there
    ref = greedy_answer(model, ids, mask, pos, images, n_prompt, max_new=6, eos_id=eos, use_cache=False)
    got = greedy_answer(model, ids, mask, pos, images, n_prompt, max_new=6, eos_id=eos)
    assert got == ref and len(ref[1]) < 6
