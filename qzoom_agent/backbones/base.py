"""The small protocol every model family implements: encode images at a budget, run decoder layers in
ranges with explicit M-RoPE ids, and expose the facts (cell size, token ids) the pipeline needs.

The transformers model is used as it is: we call its vision tower, embedding, rotary embedding, decoder
layers, final norm and LM head directly, so layers 0..K-1 and K..L-1 can run separately (prefix-KV reuse).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..errors import QZoomError


@dataclass
class VisualBlock:
    """One encoded image. embeds: (h·w, d) in raster order over the merged grid; deepstack: per-layer (h·w, d)."""

    embeds: torch.Tensor
    grid_hw: tuple[int, int]          # merged grid (rows, cols): one LLM token per cell
    resized_hw: tuple[int, int]       # processor's resized image (height, width) px = grid · cell_px
    original_hw: tuple[int, int]      # source image (height, width) px
    deepstack: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_patches(self) -> int:
        return self.num_tokens * 4


class KVCache:
    """Minimal per-layer KV store with the `update(k, v, layer_idx)` call transformers' attention makes.

    Tensors are (B, kv_heads, L, head_dim). Kept by hand (not DynamicCache) because the pipeline slices,
    regroups and re-aligns prefixes per sample, which needs plain tensors.
    """

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.k:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], key], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], value], dim=2)
        else:
            self.k[layer_idx], self.v[layer_idx] = key, value
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.k[layer_idx].shape[2] if layer_idx in self.k else 0

    def select(self, batch_index: torch.Tensor) -> "KVCache":
        out = KVCache()
        for i in self.k:
            out.k[i] = self.k[i].index_select(0, batch_index)
            out.v[i] = self.v[i].index_select(0, batch_index)
        return out


def cat_images(features) -> torch.Tensor:
    """One (N, d) tensor over all images from vision features given either as that tensor or split per image (a
    tuple/list of (n_i, d)): transformers versions differ in which fields of `get_image_features` they split."""
    if isinstance(features, torch.Tensor):
        return features
    return torch.cat(list(features), dim=0)


def additive_mask(key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q_len, Lk) additive mask: causal over the last q_len columns, padding keys masked.

    key_valid: (B, Lk) bool, True for real tokens. Query i sits at column Lk - q_len + i.
    Fully masked rows (padding queries) get finite values, so no NaNs appear.
    """
    B, Lk = key_valid.shape
    q_cols = torch.arange(Lk - q_len, Lk, device=key_valid.device)
    causal = torch.arange(Lk, device=key_valid.device)[None, :] <= q_cols[:, None]        # (q, Lk)
    allowed = causal[None] & key_valid[:, None, :]                                          # (B, q, Lk)
    mask = torch.zeros(B, 1, q_len, Lk, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class Backbone:
    """Adapter over a transformers Qwen-VL `...ForConditionalGeneration` model and its processor."""

    family = "base"
    cell_px = 28

    def __init__(self, hf_model, processor) -> None:
        self.hf = hf_model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        cfg = hf_model.config
        self.text_config = cfg.text_config
        inner = hf_model.model
        self.visual = inner.visual
        self.lm = inner.language_model
        self.layers = self.lm.layers
        self.image_token_id = cfg.image_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id
        eos = hf_model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid not in eos:
                eos.append(tid)
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def decoder_layer_class(self):
        return type(self.layers[0])

    # -- vision --------------------------------------------------------------------------------------
    def budget_pixels(self, min_tokens: int, max_tokens: int) -> tuple[int, int]:
        return min_tokens * self.cell_px ** 2, max_tokens * self.cell_px ** 2

    def resized_hw(self, image_hw: tuple[int, int], min_tokens: int, max_tokens: int) -> tuple[int, int]:
        """Qwen's smart resize: multiples of the cell size, pixel count inside the budget, aspect kept."""
        lo, hi = self.budget_pixels(min_tokens, max_tokens)
        h, w = image_hw
        try:
            return tuple(smart_resize(h, w, factor=self.cell_px, min_pixels=lo, max_pixels=hi))
        except ValueError as e:
            raise QZoomError(f"image of {w}x{h} px cannot be encoded: {e}") from None

    def _vision_forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Returns (embeds (N, d), deepstack list or None) for the concatenated images."""
        out = self.hf.model.get_image_features(pixel_values.to(self.device), grid_thw.to(self.device),
                                               return_dict=True)
        return cat_images(out.pooler_output), None

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], min_tokens: int, max_tokens: int) -> list[VisualBlock]:
        """Encode RGB images at the token budget in one ViT call; one VisualBlock per image."""
        if not images:
            return []
        lo, hi = self.budget_pixels(min_tokens, max_tokens)
        pixel_values, grids, sizes = [], [], []
        for img in images:
            sizes.append((img.height, img.width))
            rh, rw = self.resized_hw((img.height, img.width), min_tokens, max_tokens)
            enc = self.processor.image_processor(images=[img], size={"shortest_edge": lo, "longest_edge": hi},
                                                 return_tensors="pt")
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
            t, gh, gw = enc["image_grid_thw"][0].tolist()
            if (gh // 2 * self.cell_px, gw // 2 * self.cell_px) != (rh, rw):
                raise QZoomError(f"processor resized to {gw // 2 * self.cell_px}x{gh // 2 * self.cell_px} px "
                                 f"but the budget rule gives {rw}x{rh}: processor patch size does not match "
                                 f"the model family {self.family}")
        pv = torch.cat(pixel_values).to(self.visual.dtype if hasattr(self.visual, "dtype") else self.dtype)
        grid_thw = torch.cat(grids)
        embeds, deepstack = self._vision_forward(pv, grid_thw)
        blocks, start = [], 0
        for (t, gh, gw), hw in zip(grid_thw.tolist(), sizes):
            n = t * (gh // 2) * (gw // 2)
            ds = [d[start:start + n] for d in deepstack] if deepstack is not None else None
            blocks.append(VisualBlock(embeds=embeds[start:start + n], grid_hw=(gh // 2, gw // 2),
                                      resized_hw=(gh // 2 * self.cell_px, gw // 2 * self.cell_px),
                                      original_hw=hw, deepstack=ds))
            start += n
        return blocks

    # -- language model ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """cos/sin for (3, B, L) M-RoPE ids (float ids allowed: the rotary multiplies pos.float())."""
        return self.lm.rotary_emb(hidden, position_ids)

    def run_layers(self, hidden: torch.Tensor, start: int, end: int, position_embeddings, mask: torch.Tensor,
                   cache: KVCache | None = None, deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
                   layers=None) -> torch.Tensor:
        """Run decoder layers [start, end) (of `layers`, default the model's own) on hidden (B, L, d)."""
        layers = self.layers if layers is None else layers
        for i in range(start, end):
            hidden = layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                               past_key_values=cache, use_cache=cache is not None)
            hidden = self._after_layer(hidden, i, deepstack)
        return hidden

    def _after_layer(self, hidden, layer_idx, deepstack):
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)

    # -- heads ---------------------------------------------------------------------------------------
    def qk_for_scores(self, attn, hidden_normed: torch.Tensor, position_embeddings):
        """Query and key states (B, heads, L, hd), (B, kv_heads, L, hd) of an attention module, M-RoPE applied."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        B, L, _ = hidden_normed.shape
        hd = attn.head_dim
        q = attn.q_proj(hidden_normed).view(B, L, -1, hd).transpose(1, 2)
        k = attn.k_proj(hidden_normed).view(B, L, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin)

    def sink_rule(self) -> str:
        return "qwen25_corner"
