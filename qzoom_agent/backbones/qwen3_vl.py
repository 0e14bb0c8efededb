"""Qwen3-VL adapter: 16 px patches → 32 px cells, q/k RMS norms before RoPE, DeepStack visual features
added to the hidden states of the first decoder layers at the visual positions, sink-token rule."""
from __future__ import annotations

import torch

from .base import Backbone, cat_images


def vision_features(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(embeds (N, d), [per deepstack level (N, d)]) over all images from `get_image_features(..., return_dict=True)`.

    The layout differs across transformers versions: 5.17 returns `pooler_output` split per image (a tuple) but each
    `deepstack_features` level as one (N, d) tensor over all images; 5.23 splits both per image. Either is accepted.
    """
    return cat_images(out.pooler_output), [cat_images(level) for level in out.deepstack_features]


class Qwen3VLBackbone(Backbone):
    family = "qwen3_vl"
    cell_px = 32

    def _vision_forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        out = self.hf.model.get_image_features(pixel_values.to(self.device), grid_thw.to(self.device),
                                               return_dict=True)
        return vision_features(out)

    def _after_layer(self, hidden, layer_idx, deepstack):
        """deepstack = (visual_mask (B, L) bool, [per-layer (n_visual, d)]), rows in mask order."""
        if deepstack is None:
            return hidden
        mask, levels = deepstack
        if layer_idx < len(levels) and mask.any():
            hidden = hidden.clone()
            hidden[mask] = hidden[mask] + levels[layer_idx].to(hidden.dtype)
        return hidden

    def qk_for_scores(self, attn, hidden_normed, position_embeddings):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        B, L, _ = hidden_normed.shape
        hd = attn.head_dim
        q = attn.q_norm(attn.q_proj(hidden_normed).view(B, L, -1, hd)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hidden_normed).view(B, L, -1, hd)).transpose(1, 2)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin)

    def sink_rule(self) -> str:
        return "qwen3_token"

    @property
    def num_deepstack(self) -> int:
        return len(self.hf.config.vision_config.deepstack_visual_indexes)
