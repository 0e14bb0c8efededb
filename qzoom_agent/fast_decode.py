"""Greedy decoding over a preallocated KV cache, in one fixed-shape step that CUDA graphs can replay.

The engine's plain loop (`QZoomModel._greedy_tokens`) grows the KV cache by concatenation, rebuilds the mask
and syncs with the host at every token: at 7B on an H100 that is launch-bound (≈ 19 ms a token against a ≈ 5 ms
weight-bandwidth floor). `FastDecoder` keeps everything one decode step touches in fixed buffers:

- `StaticKVCache`: per layer (B, kv_heads, max_len, hd) K and V; `update()` (the call transformers' attention
  makes) writes the new token's K/V in place at column `column` and returns the whole buffer;
- an additive mask (B, 1, 1, max_len): the prompt's padding and every column not yet written are masked, and a
  step unmasks its own column before attending, so attending over the whole buffer equals attending over the
  filled part (masked scores add finfo.min: their softmax weight is exactly 0);
- the next M-RoPE ids (3, B, 1), float, continuing from each row's last (fused, possibly fractional) position,
  the last token, per-row done flags and the token record.

One step = pick the input token (pad for finished rows) → unmask its column → embed → rotary → all decoder
layers over the static cache → logits → argmax → record → advance column, positions and step. It never reads a
value back to the host, so the step can be captured once as a CUDA graph per (batch, max_len) and replayed;
the host checks "all rows done" every `check_every` steps. The output is cut at each row's first EOS, which
gives exactly the plain loop's tokens (steps run after every row finished are discarded).

Decode attention: with grouped KV heads (7B: 28 query heads over 4 KV heads) and a mask, transformers' sdpa path
repeats K/V per query head before attending (`repeat_kv`), so a step reads and writes 2·G× the cache. While a
step runs, the text attention uses `packed_gqa_attention` instead: the G query heads of one KV head are one
(G, hd) query block, so K/V are read once (same math; rows are independent), in two batched GEMMs that spread
the cache length over the GPU (an SDPA call with 7 query rows per head runs one tile per (row, KV head)).
Other shapes go to sdpa unchanged. `decode_attention="packed_sdpa"` keeps one SDPA call; "sdpa" is stock.

Modes: "static" (eager; the CPU path and the reference for the others), "graph" (torch.cuda.CUDAGraph capture
of the step, CUDA only), "compile" (torch.compile(mode="reduce-overhead") of the step, CUDA only).
max_len is rounded up to a multiple of `bucket` so that graphs are reused across prompts of similar length.

    from qzoom_agent.fast_decode import enable_fast_paths
    enable_fast_paths(qzoom_model)          # fast ViT attention + "graph" decoding on CUDA, "static" on CPU
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones import KVCache
from .backbones.fast_vision import install_fast_vision, uninstall_fast_vision
from .errors import QZoomError

MODES = ("static", "graph", "compile")
DECODE_ATTENTIONS = {"packed_math": "qzoom_packed_gqa_math", "packed_sdpa": "qzoom_packed_gqa_sdpa"}


def _packed_gqa(module, query, key, value, attention_mask, dropout, scaling, kwargs, kernel: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, Q, D = query.shape
    KV = key.shape[1]
    per_head_mask = attention_mask is not None and (attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1)
    if Q != 1 or KV == H or H % KV or per_head_mask or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(B, KV, H // KV, D)                                                  # (B, KV, G, hd)
    scale = D ** -0.5 if scaling is None else scaling
    if kernel == "sdpa":
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scale)
    else:                            # two batched GEMMs: parallel over the cache length, unlike a 1-row SDPA tile
        scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scale             # (B, KV, G, L), fp32
        if attention_mask is not None:                                                     # as SDPA accumulates
            scores = scores + attention_mask.float()
        out = torch.matmul(scores.softmax(-1), value.float()).to(value.dtype)
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def packed_gqa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface. query (B, H, 1, hd), key/value (B, KV, L, hd), mask (B, 1, 1, L) additive
    → (B, 1, H, hd). Query head h uses KV head h // G (as `repeat_kv`), so the queries regroup as (B, KV, G, hd)
    and attend to un-repeated K/V with explicit fp32 GEMMs and softmax. Anything else (prefill, MHA, per-head masks)
    → transformers' sdpa."""
    return _packed_gqa(module, query, key, value, attention_mask, dropout, scaling, kwargs, "math")


def packed_gqa_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              **kwargs) -> tuple[torch.Tensor, None]:
    """As `packed_gqa_attention`, with one SDPA call on the regrouped queries instead of the two GEMMs."""
    return _packed_gqa(module, query, key, value, attention_mask, dropout, scaling, kwargs, "sdpa")


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    # looked up at call time, so tests can wrap the module-level functions
    AttentionInterface.register(DECODE_ATTENTIONS["packed_math"], lambda *a, **k: packed_gqa_attention(*a, **k))
    AttentionInterface.register(DECODE_ATTENTIONS["packed_sdpa"], lambda *a, **k: packed_gqa_sdpa_attention(*a, **k))


class StaticKVCache:
    """Fixed (B, kv_heads, max_len, hd) K/V per layer; `update` writes at `column` (a (1,) long tensor) in place."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.max_len = max_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.column, key)
        self.v[layer_idx].index_copy_(2, self.column, value)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.max_len

    def load(self, cache: KVCache) -> int:
        """Copy a prefill cache (every layer (B, kv_heads, L0, hd)) into columns [0, L0). Returns L0."""
        L0 = cache.k[0].shape[2]
        for i in range(len(self.k)):
            self.k[i][:, :, :L0].copy_(cache.k[i])
            self.v[i][:, :, :L0].copy_(cache.v[i])
        return L0


@dataclass
class DecodeState:
    """Every tensor one step reads or writes; fixed addresses, so a captured graph can be replayed on them."""

    cache: StaticKVCache
    mask: torch.Tensor        # (B, 1, 1, max_len) additive
    pos: torch.Tensor         # (3, B, 1) float: M-RoPE ids of the next token
    tok: torch.Tensor         # (B,) long: last picked token
    done: torch.Tensor        # (B,) bool
    tokens: torch.Tensor      # (B, max_len) long: picked tokens, step by step
    step: torch.Tensor        # (1,) long: next slot in `tokens`
    eos: torch.Tensor         # (E,) long
    pad: torch.Tensor         # () long
    graph: object = None      # torch.cuda.CUDAGraph or compiled callable, once captured


class FastDecoder:
    """Static-cache greedy decoding for a `Backbone` (see the module docstring)."""

    def __init__(self, backbone, mode: str = "static", check_every: int = 4, bucket: int = 256,
                 max_states: int = 4, record_logits: bool = False, merge_groups: bool = True,
                 decode_attention: str = "packed_math") -> None:
        if mode not in MODES:
            raise QZoomError(f"decode mode must be one of {MODES}, got {mode!r}")
        if mode != "static" and backbone.device.type != "cuda":
            raise QZoomError(f"decode mode {mode!r} needs a CUDA model (this one is on {backbone.device})")
        self.bb, self.mode = backbone, mode
        self.check_every, self.bucket, self.max_states = max(1, check_every), max(1, bucket), max_states
        self.record_logits = record_logits          # eager only: keep every step's logits (tests)
        self.merge_groups = merge_groups            # the engine decodes direct and zoomed rows as one batch
        self.logits_log: list[torch.Tensor] = []
        self.states: OrderedDict = OrderedDict()
        self.captures = 0                           # graphs captured so far (a capture costs warm-up + record)
        if decode_attention not in ("sdpa", *DECODE_ATTENTIONS):
            raise QZoomError(f"decode_attention must be 'sdpa' or one of {list(DECODE_ATTENTIONS)}, "
                             f"got {decode_attention!r}")
        self.decode_attention = decode_attention    # what decode steps attend with, on models set to sdpa
        if decode_attention != "sdpa":
            _register_decode_attention()

    @contextmanager
    def _decode_attention(self):
        """Swap the text attention to the packed decode attention for the steps inside (only where it was sdpa)."""
        cfg = self.bb.layers[0].self_attn.config
        prev = cfg._attn_implementation
        if self.decode_attention == "sdpa" or prev != "sdpa":
            yield
            return
        cfg._attn_implementation = DECODE_ATTENTIONS[self.decode_attention]
        try:
            yield
        finally:
            cfg._attn_implementation = prev

    # ------------------------------------------------------------------------------------------ state
    def _state(self, batch: int, max_len: int, like: KVCache, dtype: torch.dtype) -> DecodeState:
        key = (batch, max_len, dtype)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= self.max_states:
            self.states.popitem(last=False)
        dev, bb = self.bb.device, self.bb
        _, kv_heads, _, hd = like.k[0].shape
        st = DecodeState(
            cache=StaticKVCache(bb.num_layers, batch, kv_heads, max_len, hd, like.k[0].dtype, dev),
            mask=torch.full((batch, 1, 1, max_len), torch.finfo(dtype).min, dtype=dtype, device=dev),
            pos=torch.zeros(3, batch, 1, dtype=torch.float32, device=dev),
            tok=torch.zeros(batch, dtype=torch.long, device=dev),
            done=torch.zeros(batch, dtype=torch.bool, device=dev),
            tokens=torch.zeros(batch, max_len, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            eos=torch.tensor(bb.eos_ids, dtype=torch.long, device=dev),
            pad=torch.tensor(bb.pad_id, dtype=torch.long, device=dev))
        self.states[key] = st
        return st

    # ------------------------------------------------------------------------------------------- step
    def _step(self, st: DecodeState) -> torch.Tensor:
        """One greedy step on `st`, in place; returns the step's logits (B, vocab)."""
        bb = self.bb
        tok_in = torch.where(st.done, st.pad, st.tok)[:, None]                      # (B, 1)
        st.mask.index_fill_(3, st.cache.column, 0.0)
        h = bb.embed(tok_in)
        pe = bb.rotary(h, st.pos)
        h = bb.run_layers(h, 0, bb.num_layers, pe, st.mask, st.cache)
        logits = bb.logits(bb.final_norm(h))[:, -1]
        tok = logits.argmax(-1)
        st.tok.copy_(tok)
        st.tokens.index_copy_(1, st.step, tok[:, None])
        st.done.logical_or_(torch.eq(tok[:, None], st.eos[None, :]).any(-1))
        st.cache.column.add_(1)
        st.pos.add_(1.0)
        st.step.add_(1)
        return logits

    def _capture(self, st: DecodeState) -> None:
        """Record the step as a CUDA graph (after warm-up steps on a side stream) or compile it."""
        if self.mode == "compile":
            for t in (st.mask, st.pos, st.tok, st.done, st.tokens, st.step, st.cache.column,
                      *st.cache.k, *st.cache.v):
                torch._dynamo.mark_static_address(t)
            st.graph = torch.compile(self._step, mode="reduce-overhead", fullgraph=False, dynamic=False)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(st)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(st)
        st.graph = graph
        self.captures += 1

    def _run_step(self, st: DecodeState) -> None:
        if self.mode == "static":
            logits = self._step(st)
            if self.record_logits:
                self.logits_log.append(logits.float().cpu())
        elif self.mode == "graph":
            st.graph.replay()
        else:
            st.graph(st)

    # -------------------------------------------------------------------------------------------- api
    @torch.no_grad()
    def greedy(self, h_last: torch.Tensor, cache: KVCache, valid: torch.Tensor, last_pos: torch.Tensor,
               max_new: int) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy tokens after a prefill. h_last (B, L0, d) final-layer states, cache with every layer's prefill
        K/V (B, kv, L0, hd), valid (B, L0) bool, last_pos (3, B) M-RoPE ids of the last prompt token.

        Returns (per row the new token ids before its first EOS, at most max_new; first-step logits (B, vocab)).
        """
        bb = self.bb
        B, L0 = valid.shape
        if cache.k[0].shape[2] != L0:
            raise QZoomError(f"cache holds {cache.k[0].shape[2]} positions but valid has {L0}")
        logits0 = bb.logits(bb.final_norm(h_last[:, -1:]))[:, -1]
        self.logits_log = [logits0.float().cpu()] if self.record_logits else []
        max_len = -(-(L0 + max_new) // self.bucket) * self.bucket
        st = self._state(B, max_len, cache, h_last.dtype)
        if st.graph is None and self.mode != "static":
            with self._decode_attention():
                self._capture(st)
        st.cache.load(cache)
        dev = self.bb.device
        st.mask.fill_(torch.finfo(st.mask.dtype).min)
        st.mask[:, 0, 0, :L0].masked_fill_(valid.to(dev), 0.0)
        st.cache.column.fill_(L0)
        st.pos.copy_(last_pos.to(dev).float()[:, :, None] + 1)
        tok0 = logits0.argmax(-1)
        st.tok.copy_(tok0)
        st.tokens[:, 0] = tok0
        st.done.copy_(torch.eq(tok0[:, None], st.eos[None, :]).any(-1))
        st.step.fill_(1)
        steps = 1
        while steps < max_new:
            if (steps - 1) % self.check_every == 0 and bool(st.done.all()):
                break
            with self._decode_attention():
                self._run_step(st)
            steps += 1
        picked = st.tokens[:, :steps].tolist()
        eos = set(bb.eos_ids)
        out = [[t for t in _until(row, eos)] for row in picked]
        return out, logits0


def merge_decode_groups(groups: list) -> tuple:
    """Several (rows, h_last (R, L, d), cache, valid (R, L), last_pos (3, R)) decode groups as one batch.

    Shorter prompts are left-padded to the longest: K/V columns of zeros, marked invalid, so every row attends
    to exactly its own prompt, as when decoded alone. Only the last hidden state of each row is kept.
    Example: direct rows with 700-token prompts and zoomed rows with 1290-token fused prompts decode together
    over 1290 + new columns; the direct rows' first 590 columns are masked.
    """
    Lm = max(g[3].shape[1] for g in groups)
    rows, hs, valids, poss, merged = [], [], [], [], KVCache()
    for r, h, cache, valid, last_pos in groups:
        pad = Lm - valid.shape[1]
        rows += list(r)
        hs.append(h[:, -1:])
        valids.append(torch.cat([torch.zeros(valid.shape[0], pad, dtype=torch.bool), valid.cpu()], dim=1))
        poss.append(last_pos.cpu())
        for i in cache.k:
            k, v = (torch.nn.functional.pad(x, (0, 0, pad, 0)) for x in (cache.k[i], cache.v[i]))
            merged.k[i] = torch.cat([merged.k[i], k]) if i in merged.k else k
            merged.v[i] = torch.cat([merged.v[i], v]) if i in merged.v else v
    return rows, torch.cat(hs), merged, torch.cat(valids), torch.cat(poss, dim=1)


def _until(row: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop:
            return row[:i]
    return row


def default_decode_mode(device: torch.device) -> str:
    return "graph" if device.type == "cuda" else "static"


def enable_fast_paths(model, vision: bool = True, decode: str | None = "auto", **decoder_kw) -> None:
    """Fast ViT attention (vision) and static-cache decoding (decode: a mode, "auto", or None to keep the plain
    loop) on a QZoomModel. "auto": "graph" on CUDA, "static" on CPU."""
    if vision:
        install_fast_vision(model.base)
    if decode:
        mode = default_decode_mode(model.device) if decode == "auto" else decode
        model.fast_decoder = FastDecoder(model.backbone, mode=mode, **decoder_kw)


def disable_fast_paths(model) -> None:
    """Back to transformers' vision attention and the engine's plain decode loop."""
    uninstall_fast_vision(model.base)
    model.fast_decoder = None
