"""Batched vision attention for Qwen2.5-VL / Qwen3-VL without flash-attn: few SDPA calls instead of one per chunk.

Without flash-attn, transformers' vision attention splits q/k/v at `cu_seqlens` and calls attention once per
chunk in a Python loop: per window in Qwen2.5-VL's windowed blocks (a 4096-token image has 256 windows of 64
patches), per image in full-attention blocks. Here the chunks are grouped by length: chunks of one length go
through one `scaled_dot_product_attention` call as a batch (n_chunks, heads, length, head_dim), gathered by an
index (or taken as a view when they lie back to back), and the outputs are scattered back. No padding, no mask:
every chunk attends to exactly its own tokens, as in the stock loop, so outputs match it to rounding.

    install_fast_vision(hf_model)     # swaps the class of every vision attention module (weights untouched)
    uninstall_fast_vision(hf_model)   # restores the stock classes

Worked example (Qwen2.5-VL, one 448×336 image: 32×24 patches, 16×12 merged cells, windows of 4×4 cells =
64 patches): the 4×3 = 12 windows are all full, so each windowed block makes one SDPA call of shape
(12, heads, 64, hd) on a view of q/k/v; the full-attention blocks make one call (1, heads, 768, hd). A 476×336
image (17×12 cells) adds a column of 3 windows of 1×4 cells = 16 patches: two calls (12×64, 3×16).

The grouping plan is computed once per `cu_seqlens` tensor (the vision tower passes the same tensor to every
block of a kind), so a forward makes two host syncs for plans instead of one per block.

Two more swaps in the vision tower (measured on an H100 at 4096 tokens, eval/results/profile_latency_*.md):
- the gated MLP (Qwen2.5-VL: gate/up 1280 → 3420, down 3420 → 1280) runs as one gate+up GEMM and one down GEMM on
  copies whose inner size is zero-padded to a multiple of 64: 3420 is not a multiple of 8, so cuBLAS falls back to
  2-byte-aligned sm80 kernels (58 of 152 ms). Zero rows give silu(0)·0 = 0 and zero columns add nothing, so the
  output equals the stock MLP to rounding. The copies are rebuilt when a weight changes (in-place version bump);
- the vision RMSNorm uses `F.rms_norm` (one fused kernel on CUDA) with the stock fp32 math.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VISION_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention")
VISION_MLP_CLASSES = ("Qwen2_5_VLMLP",)                    # gated MLPs of the vision blocks
VISION_NORM_CLASSES = ("Qwen2_5_VLRMSNorm", "Qwen2RMSNorm")
PAD_MULTIPLE = 64
_FAST_CLASSES: dict[type, type] = {}


@dataclass
class ChunkGroup:
    """Chunks of one length. index: (n, length) token rows, or None when the chunks lie back to back from start."""

    length: int
    count: int
    start: int
    index: torch.Tensor | None


def plan_chunks(cu_seqlens: torch.Tensor) -> list[ChunkGroup]:
    """Group the chunks [cu[i], cu[i+1]) by length (empty chunks dropped), longest first.

    >>> [(g.length, g.count, g.index is None) for g in plan_chunks(torch.tensor([0, 64, 128, 144, 160]))]
    [(64, 2, True), (16, 2, True)]
    """
    cu = cu_seqlens.tolist()
    by_len: dict[int, list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            by_len.setdefault(b - a, []).append(a)
    groups = []
    for length in sorted(by_len, reverse=True):
        starts = by_len[length]
        contiguous = all(s == starts[0] + i * length for i, s in enumerate(starts))
        index = None
        if not contiguous:
            index = (torch.tensor(starts, device=cu_seqlens.device)[:, None]
                     + torch.arange(length, device=cu_seqlens.device)[None, :])
        groups.append(ChunkGroup(length, len(starts), starts[0], index))
    return groups


class _PlanCache:
    """Last plans by `cu_seqlens` identity (one for windowed blocks, one for full attention); holds the tensors
    alive, so identity cannot be reused by a new tensor while cached."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[torch.Tensor, list[ChunkGroup]]] = []

    def get(self, cu_seqlens: torch.Tensor) -> list[ChunkGroup]:
        for cu, plan in self.entries:
            if cu is cu_seqlens:
                return plan
        plan = plan_chunks(cu_seqlens)
        self.entries = [(cu_seqlens, plan)] + self.entries[: self.size - 1]
        return plan


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[ChunkGroup],
                      scale: float) -> torch.Tensor:
    """Block-diagonal attention over packed tokens. q, k, v: (S, heads, hd) → (S, heads, hd)."""
    S, H, D = q.shape
    covered = sum(g.length * g.count for g in plan)
    out = q.new_zeros(S, H, D) if covered != S else torch.empty_like(q)

    def batched(x, g):                                               # (n, H, length, D)
        if g.index is None:
            return x[g.start:g.start + g.count * g.length].view(g.count, g.length, H, D).transpose(1, 2)
        return x[g.index].transpose(1, 2)

    for g in plan:
        o = F.scaled_dot_product_attention(batched(q, g), batched(k, g), batched(v, g), scale=scale)
        o = o.transpose(1, 2)                                        # (n, length, H, D)
        if g.index is None:
            out[g.start:g.start + g.count * g.length] = o.reshape(-1, H, D)
        else:
            out[g.index.reshape(-1)] = o.reshape(-1, H, D)
    return out


def _rotary_fn(module: nn.Module):
    return sys.modules[module._qzoom_stock.__module__].apply_rotary_pos_emb_vision


def _fast_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb=None,
                  position_embeddings=None, **kwargs) -> torch.Tensor:
    """The stock forward's math (qkv → vision RoPE → attention per chunk → proj), attention grouped by length."""
    if "flash" in (getattr(self.config, "_attn_implementation", None) or ""):       # varlen kernels: nothing to group
        if rotary_pos_emb is not None:
            kwargs["rotary_pos_emb"] = rotary_pos_emb
        return self._qzoom_stock.forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                         **kwargs)
    S = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is None:                                  # older transformers: raw rotary freqs
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    cos, sin = position_embeddings
    q, k = _rotary_fn(self)(q, k, cos, sin)
    out = grouped_attention(q, k, v, self._qzoom_plans.get(cu_seqlens), self.scaling)
    return self.proj(out.reshape(S, -1))


def _padded_mlp_weights(self) -> tuple:
    """(W_gu (2P, d), b_gu (2P,) or None, W_down (d, P), b_down or None, P): gate rows [0, I), up rows [P, P+I),
    zeros elsewhere; cached until a weight's in-place version or device/dtype changes."""
    ps = [p for lin in (self.gate_proj, self.up_proj, self.down_proj) for p in (lin.weight, lin.bias) if p is not None]
    key = tuple((p._version, p.data_ptr(), p.dtype) for p in ps)
    if getattr(self, "_qzoom_pad_key", None) != key:
        g, u, dn = self.gate_proj, self.up_proj, self.down_proj
        inner, d = g.weight.shape
        P = -(-inner // PAD_MULTIPLE) * PAD_MULTIPLE
        with torch.no_grad():
            w_gu = g.weight.new_zeros(2 * P, d)
            w_gu[:inner], w_gu[P:P + inner] = g.weight, u.weight
            b_gu = None
            if g.bias is not None:
                b_gu = g.bias.new_zeros(2 * P)
                b_gu[:inner], b_gu[P:P + inner] = g.bias, u.bias
            w_dn = dn.weight.new_zeros(dn.weight.shape[0], P)
            w_dn[:, :inner] = dn.weight
        self._qzoom_pad = (w_gu, b_gu, w_dn, dn.bias, P)
        self._qzoom_pad_key = key
    return self._qzoom_pad


def _fast_mlp_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """act(gate(x)) · up(x) → down, as the stock MLP, through the padded fused copies. x (S, d) → (S, d)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
        return self._qzoom_stock.forward(self, hidden_state)             # training: gradients reach the weights
    w_gu, b_gu, w_dn, b_dn, P = _padded_mlp_weights(self)
    gate, up = F.linear(hidden_state, w_gu, b_gu).split(P, dim=-1)
    return F.linear(self.act_fn(gate) * up, w_dn, b_dn)


def _fast_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The stock RMSNorm (fp32 statistics, weight applied in the input dtype) as one fused kernel."""
    dtype = hidden_states.dtype
    normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
    return self.weight * normed.to(dtype)


_FORWARDS = {"attn": _fast_forward, "mlp": _fast_mlp_forward, "norm": _fast_norm_forward}


def _fast_class(cls: type, kind: str = "attn") -> type:
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type("Fast" + cls.__name__, (cls,),
                                  {"forward": _FORWARDS[kind], "_qzoom_stock": cls, "_qzoom_kind": kind})
    return _FAST_CLASSES[cls]


def _vision_tower(model: nn.Module) -> nn.Module | None:
    for name, m in model.named_modules():
        if name.split(".")[-1] == "visual":
            return m
    return None


def vision_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The vision attention modules (stock or fast) of a Qwen2.5-VL / Qwen3-VL model."""
    return [m for m in model.modules()
            if type(m).__name__ in VISION_ATTENTION_CLASSES or getattr(type(m), "_qzoom_kind", None) == "attn"]


def _vision_other_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, kind) for the vision tower's gated MLPs and RMSNorms, stock or fast."""
    tower = _vision_tower(model)
    if tower is None:
        return []
    out = []
    for m in tower.modules():
        name = getattr(type(m), "_qzoom_stock", type(m)).__name__
        if name in VISION_MLP_CLASSES:
            out.append((m, "mlp"))
        elif name in VISION_NORM_CLASSES and hasattr(m, "variance_epsilon"):
            out.append((m, "norm"))
    return out


def install_fast_vision(model: nn.Module) -> int:
    """Route every vision attention module of `model` through grouped SDPA, and the vision tower's gated MLPs and
    RMSNorms through the padded / fused forwards. Returns how many attention modules were swapped."""
    mods = vision_attention_modules(model)
    plans = _PlanCache()
    for m in mods:
        if not hasattr(type(m), "_qzoom_stock"):
            m.__class__ = _fast_class(type(m))
        m._qzoom_plans = plans
    for m, kind in _vision_other_modules(model):
        if not hasattr(type(m), "_qzoom_stock"):
            m.__class__ = _fast_class(type(m), kind)
    return len(mods)


def uninstall_fast_vision(model: nn.Module) -> int:
    """Restore the stock vision classes (and drop the padded MLP copies). Returns how many attention modules were
    restored."""
    n = 0
    for m in vision_attention_modules(model):
        if hasattr(type(m), "_qzoom_stock"):
            m.__class__ = type(m)._qzoom_stock
            del m._qzoom_plans
            n += 1
    for m, _ in _vision_other_modules(model):
        if hasattr(type(m), "_qzoom_stock"):
            m.__class__ = type(m)._qzoom_stock
            for attr in ("_qzoom_pad", "_qzoom_pad_key"):
                m.__dict__.pop(attr, None)
    return n


def fast_vision_installed(model: nn.Module) -> bool:
    mods = vision_attention_modules(model)
    return bool(mods) and all(hasattr(type(m), "_qzoom_stock") for m in mods)
