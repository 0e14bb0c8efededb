"""Batched training forward of the testbed with explicit 3-D M-RoPE ids, GPU patchify and dense ViT heads.

The HF modules are used unchanged: `model.model.visual` on patchified pixels, token embeddings with the image
rows scattered in, `model.model.language_model` with explicit `(3, B, L)` position ids from
`qzoom_agent.fusion.sequence_position_ids` (the same ids the engine builds at inference), `lm_head` on the
answer rows only. `check_positions` asserts the ids are really 3-D (image rows differ across t/h/w axes):
transformers silently falls back to 1-D positions when neither ids nor `mm_token_type_ids` are given.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fusion import sequence_position_ids

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(img: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 (H, W, 3) → (gh·gw, 3·T·P·P) float pixel rows in Qwen2-VL processor order (merge blocks raster)."""
    x = img.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device)[:, None, None]
    std = torch.tensor(STD, device=x.device)[:, None, None]
    x = (x - mean) / std
    C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x[None].expand(temporal, C, H, W)                 # an image is repeated over the temporal patch
    x = x.reshape(1, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, C * temporal * patch * patch)


class DenseHeads(nn.Module):
    """Linear per-token classifiers on the merged visual tokens: glyph, dot count, colour, kind (stages 1-5) and,
    with `n_shape` etc. > 0, the stage-6 `shape`, `size`, `side` labels of `glyph_sheets.coarse_labels`."""

    def __init__(self, dim: int, n_glyph: int, n_count: int = 7, n_color: int = 11, n_kind: int = 6,
                 n_shape: int = 0, n_size: int = 0, n_side: int = 0):
        super().__init__()
        sizes = dict(glyph=n_glyph, count=n_count, color=n_color, kind=n_kind, shape=n_shape, size=n_size,
                     side=n_side)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in sizes.items() if n > 0})

    def forward(self, z):
        return {k: h(z) for k, h in self.heads.items()}

    def load_partial(self, state: dict) -> list[str]:
        """Load a state dict that may lack some heads (e.g. the stage-4 `dense_heads.pt`, saved before the shape /
        size / side heads existed): present heads are loaded, the others keep their fresh init. Returns the names of
        the heads that start fresh. A head whose shape differs, or a key that is not ours, is an error."""
        res = self.load_state_dict(state, strict=False)
        if res.unexpected_keys:
            raise KeyError(f"unexpected keys in dense heads state: {res.unexpected_keys}")
        return sorted({k.split(".")[1] for k in res.missing_keys})


def dense_loss(logits: dict, labels: dict, bg_weight: float = 0.2, weights: dict | None = None):
    """Class-balanced CE per label: mean over labelled foreground cells + bg_weight · mean over background cells;
    the sum over labels, each times `weights.get(label, 1)` (a weight of 0 skips the label). Labels missing from
    `labels` are skipped."""
    total, stats = 0.0, {}
    weights = weights or {}
    for k, lg in logits.items():
        w = float(weights.get(k, 1.0))
        if k not in labels or w == 0.0:
            continue
        y = labels[k]
        fg, bg = y > 0, y == 0
        loss = 0.0
        if fg.any():
            loss = loss + F.cross_entropy(lg[fg].float(), y[fg])
            stats[f"acc_{k}"] = (lg[fg].argmax(-1) == y[fg]).float().mean().item()
        if bg.any():
            loss = loss + bg_weight * F.cross_entropy(lg[bg].float(), y[bg])
        total = total + w * loss
    return total, stats


def vision(model, images: list[torch.Tensor]):
    """Merged visual tokens (sum of cells, d) for uint8 GPU images (each H, W multiples of 28)."""
    pix = torch.cat([patchify(im) for im in images]).to(model.dtype if model.dtype != torch.float32 else torch.float32)
    thw = torch.tensor([[1, im.shape[0] // 14, im.shape[1] // 14] for im in images], device=pix.device)
    out = model.model.visual(pix, grid_thw=thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def check_positions(pos: torch.Tensor, ids: torch.Tensor, image_token_id: int) -> None:
    """Assert (3, B, L) ids whose image rows are genuinely 3-D (h and w axes differ somewhere)."""
    assert pos.dim() == 3 and pos.shape[0] == 3, f"expected (3, B, L) M-RoPE ids, got {tuple(pos.shape)}"
    img = ids == image_token_id
    if img.any():
        h, w = pos[1][img], pos[2][img]
        assert not torch.equal(h, w) or h.numel() == 1, "image M-RoPE ids are 1-D (h == w everywhere)"
        t = pos[0][img]
        assert not torch.equal(t, h) or h.numel() == 1, "image M-RoPE ids are 1-D (t == h everywhere)"


def collate(seqs, pad_id: int, image_token_id: int, device):
    """Right-padded ids (B, L), mask, explicit (3, B, L) positions, the flat image list, answer targets."""
    B = len(seqs)
    L = max(len(s.ids) for s in seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((3, B, L), dtype=torch.float32)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        t = torch.tensor(s.ids, dtype=torch.long)
        ids[b, :len(t)] = t
        mask[b, :len(t)] = 1
        pos[:, b, :len(t)] = sequence_position_ids(t, image_token_id, s.slots)
        if len(t) > s.n_prompt:   # predict answer tokens: logits at i-1 predict token i
            labels[b, s.n_prompt:len(t)] = t[s.n_prompt:]
    images = [im for s in seqs for im in s.images]
    return ids.to(device), mask.to(device), pos.to(device), labels.to(device), images


def shared_vision(model, seqs, device):
    """Visual tokens for a batch whose sequences may share images (`meta['group']`: several prompts of one
    rendered item): the ViT runs once per group, its rows repeated in sequence order (as `collate` lays them)."""
    first: dict = {}
    for i, s in enumerate(seqs):
        first.setdefault(s.meta.get("group", ("seq", i)), i)
    order = list(first.values())
    ims = [torch.from_numpy(np.ascontiguousarray(im)).to(device, non_blocking=True)
           for i in order for im in seqs[i].images]
    z = vision(model, ims)
    sizes = [sum(h * w for h, w in (sl.grid_hw for sl in seqs[i].slots)) for i in order]
    parts = dict(zip(first.keys(), torch.split(z, sizes)))
    if len(order) == len(seqs):
        return z
    return torch.cat([parts[s.meta.get("group", ("seq", i))] for i, s in enumerate(seqs)])


def lens_loss(model, hidden_l, seqs):
    """Logit-lens aux: at the answer position of MC prompts, decoder layer l's output (final norm + lm_head, both
    frozen here) predicts the option text's token (`meta['lens']`), so the read detail is explicit before the
    letter."""
    rows, cols, ys = [], [], []
    for b, s in enumerate(seqs):
        if s.meta.get("lens") is not None:
            rows.append(b)
            cols.append(s.n_prompt - 1)
            ys.append(int(s.meta["lens"]))
    if not rows:
        return None
    h = hidden_l[torch.tensor(rows, device=hidden_l.device), torch.tensor(cols, device=hidden_l.device)].float()
    norm = model.model.language_model.norm           # the output norm and head are read, not trained, by this loss
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.detach().float()
    logits = F.linear(h, model.lm_head.weight.detach().float())
    return F.cross_entropy(logits, torch.tensor(ys, device=logits.device))


class LayerTap:
    """Keeps the output hidden states of decoder layer `l` (1-based: 1 = after the first layer) of each forward
    (a forward hook, so it does not depend on how a transformers version returns `hidden_states`)."""

    def __init__(self, model, l: int):
        self.out = None
        self.h = model.model.language_model.layers[l - 1].register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.out = out[0] if isinstance(out, (tuple, list)) else out

    def remove(self):
        self.h.remove()


class LayerInputTap:
    """Keeps the input hidden states of decoder layer `l` (0-based) of each forward (a forward pre-hook)."""

    def __init__(self, model, l: int):
        self.out = None
        self.layer = model.model.language_model.layers[l]
        self.h = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.out = args[0] if args else kwargs["hidden_states"]

    def remove(self):
        self.h.remove()


def _rope_params(text_cfg):
    rp = getattr(text_cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0))
    section = rp.get("mrope_section") or (getattr(text_cfg, "rope_scaling", None) or {}).get("mrope_section")
    return float(theta), list(section)


def mrope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, section) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL M-RoPE cos/sin (B, L, head_dim) from (3, B, L) ids: frequency chunks of `section` take the t, h, w
    ids in turn, then the half is repeated (rotate-half convention), as the HF rotary module builds them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float) / head_dim))
    f = pos.float()[..., None] * inv
    f = torch.cat([m[i % 3] for i, m in enumerate(f.split(list(section), dim=-1))], dim=-1)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attn_rows(model, layer_idx: int, x_in: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
              q_idx: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (B, heads, L) of one query row per sequence (`q_idx`, (B,)) in decoder layer
    `layer_idx`, recomputed from that layer's input `x_in` (B, L, d) with the same norm, projections and M-RoPE as
    the model (checked against eager attentions in the tests), so attention can be supervised under sdpa."""
    layer = model.model.language_model.layers[layer_idx]
    att = layer.self_attn
    x = layer.input_layernorm(x_in)
    B, L, _ = x.shape
    hd = att.head_dim
    theta, section = _rope_params(model.config.text_config)
    cos, sin = mrope_cos_sin(pos, hd, theta, section)
    bi = torch.arange(B, device=x.device)
    q = att.q_proj(x[bi, q_idx]).view(B, -1, hd).float()                       # (B, H, hd)
    q = _rotate(q, cos[bi, q_idx][:, None], sin[bi, q_idx][:, None])
    k = att.k_proj(x).view(B, L, -1, hd).transpose(1, 2).float()               # (B, KV, L, hd)
    k = _rotate(k, cos[:, None], sin[:, None])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)                  # GQA: head h reads kv head h // rep
    sc = torch.einsum("bhd,bhld->bhl", q, k) * hd ** -0.5
    valid = mask.bool() & (torch.arange(L, device=x.device)[None] <= q_idx[:, None])
    return sc.masked_fill(~valid[:, None], float("-inf")).softmax(-1)


def option_losses(model, x_in, pos, mask, seqs, layer_idx: int, head: int, tap_mid=None, letter_head=None):
    """Stage-4 MC routing aux losses on sequences with `meta['spans']` (token spans of the option lines) and
    `meta['gold']` (the correct line): (a) attention of `head` in decoder layer `layer_idx` from the answer position
    onto the correct line (-log of its attention mass); (b) optional: a linear `letter_head` on `tap_mid` (a layer's
    output) names each option line's letter at every token of the line. Returns (attn loss, letter loss, attn mass)."""
    rows = [b for b, s in enumerate(seqs) if s.meta.get("spans")]
    if not rows:
        return None, None, None
    dev = x_in.device
    r = torch.tensor(rows, device=dev)
    q_idx = torch.tensor([seqs[b].n_prompt - 1 for b in rows], device=dev)
    a = attn_rows(model, layer_idx, x_in[r], pos[:, r], mask[r], q_idx)[:, head]     # (R, L)
    tgt = torch.zeros_like(a)
    for i, b in enumerate(rows):
        s0, s1 = seqs[b].meta["spans"][seqs[b].meta["gold"]]
        tgt[i, s0:s1] = 1.0
    mass = (a * tgt).sum(-1).clamp_min(1e-6)
    l_att = -mass.log().mean()
    l_let = None
    if letter_head is not None and tap_mid is not None:
        hs, ys = [], []
        for b in rows:
            for j, (s0, s1) in enumerate(seqs[b].meta["spans"]):
                hs.append(tap_mid[b, s0:s1])
                ys += [j] * (s1 - s0)
        l_let = F.cross_entropy(letter_head(torch.cat(hs)).float(), torch.tensor(ys, device=dev))
    return l_att, l_let, mass.detach().mean()


def embed_with_images(model, ids, pos, z):
    """Token embeddings (B, L, d) with the visual tokens' rows replaced by z (n_visual, d), in order; checks the
    3-D positions and that z has one row per image token."""
    check_positions(pos, ids, model.config.image_token_id)
    emb = model.model.get_input_embeddings()(ids)
    img_mask = (ids == model.config.image_token_id)
    assert int(img_mask.sum()) == z.shape[0], (int(img_mask.sum()), z.shape)
    return emb.masked_scatter(img_mask[..., None].expand_as(emb), z.to(emb.dtype))


def lm_forward(model, ids, mask, pos, images, *, image_embeds=None, output_attentions=False):
    """Hidden states (B, L, d) of the language model with explicit 3-D positions; returns (hidden, z, attn)."""
    z = image_embeds if image_embeds is not None else vision(model, images)
    emb = embed_with_images(model, ids, pos, z)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                     output_attentions=output_attentions, use_cache=False)
    return out.last_hidden_state, z, getattr(out, "attentions", None)


def qa_loss(model, hidden, labels):
    """Next-token CE on answer tokens only; returns (loss, token acc, first-answer-token acc)."""
    tgt = labels[:, 1:]
    h = hidden[:, :-1]
    sel = tgt != -100
    logits = model.lm_head(h[sel]).float()
    y = tgt[sel]
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():
        acc = (logits.argmax(-1) == y).float().mean().item()
    return loss, acc


@torch.no_grad()
def greedy_answer(model, ids, mask, pos, images, n_prompt: list[int], max_new: int = 12, eos_id: int | None = None,
                  use_cache: bool = True, record: list | None = None):
    """Greedy answers of a right-padded prompt batch (ids (B, L), mask, pos (3, B, L), flat images). Returns the
    new token lists (up to EOS). With `use_cache`, one prefill then one token per step over a KV cache (new tokens
    sit after every row's padding, masked out, positions continuing each row's own); else the prefix is re-run
    every step (the reference the cached path is tested against). `record`: a list that receives each step's
    logits (B, vocab), for tests."""
    if not use_cache:
        return _greedy_answer_recompute(model, ids, mask, pos, images, n_prompt, max_new, eos_id, record)
    B, dev = ids.shape[0], ids.device
    L0 = max(n_prompt)
    ids, mask, pos = ids[:, :L0], mask[:, :L0], pos[:, :, :L0]
    lm, embed = model.model.language_model, model.model.get_input_embeddings()
    emb = embed_with_images(model, ids, pos, vision(model, images))
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True)
    rows = torch.arange(B, device=dev)
    last = torch.tensor(n_prompt, device=dev) - 1
    h = out.last_hidden_state[rows, last]                                      # (B, d)
    nxt_pos = pos[:, rows, last] + 1                                           # (3, B)
    cache, outs, done = out.past_key_values, [[] for _ in range(B)], [False] * B
    for step in range(max_new):
        logits = model.lm_head(h)
        if record is not None:
            record.append(logits.float().cpu())
        nxt = logits.argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t == eos_id:
                done[b] = True
            else:
                outs[b].append(t)
        if all(done) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)
        out = lm(inputs_embeds=embed(nxt[:, None]), attention_mask=mask, position_ids=nxt_pos[:, :, None],
                 past_key_values=cache, use_cache=True)
        cache, h, nxt_pos = out.past_key_values, out.last_hidden_state[:, -1], nxt_pos + 1
    return outs


def _greedy_answer_recompute(model, ids, mask, pos, images, n_prompt, max_new, eos_id, record=None):
    B = ids.shape[0]
    z = vision(model, images)
    cur = [ids[b, :n_prompt[b]].tolist() for b in range(B)]
    poss = [pos[:, b, :n_prompt[b]] for b in range(B)]
    outs = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new):
        L = max(len(c) for c in cur)
        x = torch.full((B, L), 0, dtype=torch.long, device=ids.device)
        m = torch.zeros((B, L), dtype=torch.long, device=ids.device)
        p = torch.zeros((3, B, L), dtype=torch.float32, device=ids.device)
        for b in range(B):
            n = len(cur[b])
            x[b, :n] = torch.tensor(cur[b], device=ids.device)
            m[b, :n] = 1
            p[:, b, :n] = poss[b]
        h, _, _ = lm_forward(model, x, m, p, None, image_embeds=z)
        last = torch.tensor([len(c) - 1 for c in cur], device=ids.device)
        logits = model.lm_head(h[torch.arange(B), last])
        if record is not None:
            record.append(logits.float().cpu())
        nxt = logits.argmax(-1).tolist()
        for b in range(B):
            if done[b]:
                continue
            if nxt[b] == eos_id:
                done[b] = True
                continue
            outs[b].append(nxt[b])
            nxt_pos = poss[b][:, -1:] + 1
            cur[b].append(nxt[b])
            poss[b] = torch.cat([poss[b], nxt_pos], 1)
        if all(done):
            break
    return outs
