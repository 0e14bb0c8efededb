"""QZoomChatModel: a LangChain chat model over a local QZoomModel that fuses zoom crops on their source's grid.

One call (`_generate`) reads top to bottom:
  1. render:   LangChain messages → Qwen chat messages (tools in the template's <tools> block); every zoom crop's
               text starts with `<zoom src=K cells=...>`, re-derived from the tool artifact for this rendering
  2. encode:   each image once per process at the model's visual budget (vision cache keyed by image content)
  3. tokenize: the template's single <|image_pad|> per image expanded to the image's token count
  4. position: the model's own `get_rope_index` with the fusion seam installed (aligned_positions.py) places marked
               crops on their source grid — the same path TRL GRPO training and plain HF generate use
  5. prefill:  reuse the KV cache of the longest unchanged prefix of the previous call; run only the rest
  6. decode:   greedy (or sampled), stopping at <|im_end|>, <|im_start|>, stop strings, or text after </tool_call>
  7. parse:    <tool_call>{json}</tool_call> → tool_calls; malformed ones → invalid_tool_calls with a readable error
"""
from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, PrivateAttr

from . import roi as roi_lib
from .aligned_positions import aligned_stats, find_cores, format_zoom_marker, install_aligned_positions, \
    parse_zoom_marker
from .observations import block_payload, conversation_images
from .tool import budget, model_lock
from .tool_calls import parse_tool_calls

# --------------------------------------------------------------------------------------------------- rendering

def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for b in content or []:
        if isinstance(b, str):
            parts.append(b)
        elif isinstance(b, dict) and b.get("type") == "text":
            parts.append(b.get("text", ""))
    return "".join(parts)


def _strip_marker(text: str) -> str:
    lead = text.lstrip()
    if parse_zoom_marker(lead) is not None:
        return lead[lead.index(">") + 1:].lstrip("\n")
    return text


class _Prefix:
    """KV cache of the previous call: token ids and positions it covers, and which image each pad run holds."""

    def __init__(self, ids: torch.Tensor, pos: torch.Tensor, spans: list[tuple[int, int, str]], cache) -> None:
        self.ids, self.pos, self.spans, self.cache = ids, pos, spans, cache


class QZoomChatModel(BaseChatModel):
    """A LangChain chat model over a local `QZoomModel` (Qwen2.5-VL / Qwen3-VL) with aligned zoom-crop fusion.

    `logits_processor` (a transformers LogitsProcessor or list) shapes decoding, e.g. a scripted policy in tests.
    Attributes `stats` (vision encodes, cache hits, reused tokens) and `last_trace` (ids, positions, image spans of
    the last call) are for measurement; they never enter messages.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    logits_processor: Any = None
    reuse_prefix: bool = True
    vision_cache_size: int = 32
    stop_after_tool_call: bool = True

    _vision: OrderedDict = PrivateAttr(default_factory=OrderedDict)
    _prefix: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.RLock)
    _stats: dict = PrivateAttr(default_factory=lambda: dict(calls=0, images_encoded=0, images_cached=0,
                                                            reused_tokens=0, prefill_tokens=0))
    _trace: dict = PrivateAttr(default_factory=dict)

    def model_post_init(self, __context) -> None:
        install_aligned_positions(self.model.base, self.model.processor.tokenizer)

    @property
    def stats(self) -> dict:
        """Counters over all calls: calls, images_encoded (ViT), images_cached, reused_tokens, prefill_tokens."""
        return self._stats

    @property
    def last_trace(self) -> dict:
        """The last call's input_ids (1, L), position_ids (3, 1, L), image spans/ids/grids and reused tokens."""
        return self._trace

    @property
    def _llm_type(self) -> str:
        return "qzoom-local"

    @property
    def _identifying_params(self) -> dict:
        return {"family": self.model.config.family, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    def bind_tools(self, tools, *, tool_choice: str | None = None, **kwargs):
        """Render `tools` in the template's <tools> block; tool_choice "none" hides them for a call."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], tool_choice=tool_choice, **kwargs)

    def reset_cache(self) -> None:
        """Drop the vision cache and the prefix KV cache."""
        with self._lock:
            self._vision.clear()
            self._prefix = None

    # ------------------------------------------------------------------------------------------- 1. render
    def render(self, messages: list[BaseMessage], tools: list | None = None) -> tuple[str, list]:
        """(chat-template text with one <|image_pad|> per image, image entries in order).

        tools: OpenAI tool schemas or anything `convert_to_openai_tool` accepts (LangChain tools, functions).
        """
        tools = [t if isinstance(t, dict) else convert_to_openai_tool(t) for t in tools or []]
        entries = conversation_images(messages)
        by_msg: dict[int, list] = {}
        for e in entries:
            by_msg.setdefault(e.message_index, []).append(e)
        system = [_text_of(m.content) for m in messages if m.type == "system"]
        hf: list[dict] = [{"role": "system", "content": "\n\n".join(system)}] if system else []
        for i, m in enumerate(messages):
            if m.type in ("human", "tool"):
                hf.append({"role": "user" if m.type == "human" else "tool",
                           "content": self._render_blocks(m.content, by_msg.get(i, []), entries)})
            elif m.type == "ai":
                hf.append(self._render_ai(m))
        text = self.model.processor.apply_chat_template(hf, tools=tools or None, tokenize=False,
                                                        add_generation_prompt=True)
        return text, entries

    def _render_blocks(self, content, image_entries: list, entries: list) -> list[dict]:
        """Image blocks → placeholders; a crop's first text gets the marker for its parent in THIS rendering."""
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        out, it, pending = [], iter(image_entries), None
        for b in content:
            if block_payload(b) is not None:
                if pending is not None:
                    out.append({"type": "text", "text": pending})
                out.append({"type": "image"})
                entry = next(it, None)
                pending = self._marker(entry, entries) if entry is not None else None
                continue
            text = b if isinstance(b, str) else (b.get("text") if isinstance(b, dict) and b.get("type") == "text"
                                                 else None)
            if text is None:
                continue
            if pending is not None or out and out[-1].get("type") == "image":
                text = (pending + "\n" if pending else "") + _strip_marker(text)
                pending = None
            out.append({"type": "text", "text": text})
        if pending:
            out.append({"type": "text", "text": pending})
        return out

    def _marker(self, entry, entries) -> str | None:
        """`<zoom src=K cells=...>` for a crop whose parent is an earlier image of this conversation, else None."""
        region = entry.region
        if not region or not region.get("parent"):
            return None
        parent = next((e for e in entries if e.id == region["parent"] and e.index < entry.index), None)
        if parent is None:
            return None
        cells = region.get("box_cells")
        img = parent.image()
        lo, hi = budget(self.model)
        rh, rw = self.model.backbone.resized_hw((img.height, img.width), lo, hi)
        cell = self.model.backbone.cell_px
        grid = [rh // cell, rw // cell]
        if not cells or list(region.get("src_grid_hw") or []) != grid:
            if not region.get("box_px"):
                return None
            cells = roi_lib.pixels_to_cells(tuple(region["box_px"]), cell, (rh, rw), (img.height, img.width), grid)
        return format_zoom_marker(parent.index, tuple(cells))

    @staticmethod
    def _render_ai(m: AIMessage) -> dict:
        text = _text_of(m.content)
        for bad in getattr(m, "invalid_tool_calls", None) or []:  # shown back as the model wrote it
            text += f"\n<tool_call>\n{bad.get('args') or ''}\n</tool_call>"
        out = {"role": "assistant", "content": text.strip()}
        if m.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": tc["name"], "arguments": tc["args"]}}
                                 for tc in m.tool_calls]
        return out

    # ------------------------------------------------------------------------------------------- 2.–4. inputs
    def _encode(self, entries: list) -> list:
        """VisualBlock per image entry; only images not seen before go through the ViT (one batched call)."""
        lo, hi = budget(self.model)
        keys = [(e.key(), lo, hi) for e in entries]
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self._vision))
        if missing:
            imgs = {k: e.image() for k, e in zip(keys, entries) if k in missing}
            with model_lock(self.model):
                blocks = self.model.backbone.encode_images([imgs[k] for k in missing], lo, hi)
            for k, b in zip(missing, blocks):
                self._vision[k] = b
            self._stats["images_encoded"] += len(missing)
        self._stats["images_cached"] += len(keys) - len(missing)
        out = []
        for k in keys:
            self._vision.move_to_end(k)
            out.append(self._vision[k])
        while len(self._vision) > max(self.vision_cache_size, len(set(keys))):
            self._vision.popitem(last=False)
        return out

    def _tokenize(self, text: str, blocks: list) -> torch.Tensor:
        tok = self.model.processor.tokenizer
        pad = tok.convert_ids_to_tokens(self.model.backbone.image_token_id)
        parts = text.split(pad)
        if len(parts) != len(blocks) + 1:
            raise ValueError(f"rendered {len(parts) - 1} image placeholders for {len(blocks)} images")
        text = parts[0] + "".join(pad * b.num_tokens + p for b, p in zip(blocks, parts[1:]))
        return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def _positions(self, ids: torch.Tensor, blocks: list) -> torch.Tensor:
        merge = self.model.base.config.vision_config.spatial_merge_size
        grid_thw = torch.tensor([[1, b.grid_hw[0] * merge, b.grid_hw[1] * merge] for b in blocks],
                                dtype=torch.long).reshape(-1, 3)
        mm = (ids == self.model.backbone.image_token_id).long()
        core = find_cores(self.model.base)[0]
        pos, _ = core.get_rope_index(ids, image_grid_thw=grid_thw if blocks else None,
                                     attention_mask=torch.ones_like(ids), mm_token_type_ids=mm)
        return pos  # (3, 1, L), float32 when a crop was re-placed

    # ------------------------------------------------------------------------------------------- 5. prefill
    def _reusable(self, ids: torch.Tensor, pos: torch.Tensor, spans: list) -> int:
        """Length of the cached prefix that equals this call's (ids, positions, images), never inside an image."""
        p = self._prefix
        if p is None or not self.reuse_prefix:
            return 0
        n = min(p.ids.shape[1], ids.shape[1] - 1)
        same = (p.ids[0, :n] == ids[0, :n]) & (p.pos[:, 0, :n] == pos[:, 0, :n].to(p.pos.dtype)).all(0)
        P = int(same.long().cumprod(0).sum()) if n > 0 else 0
        old = {s: key for s, _, key in p.spans}
        for s, e, key in spans:
            if s < P and (old.get(s) != key or e > P):
                P = s
        return max(P, 0)

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, blocks: list, spans: list):
        P = self._reusable(ids, pos, spans)
        cache = None
        if P > 0:
            cache = self._prefix.cache
            extra = cache.get_seq_length() - P
            if extra > 0:
                cache.crop(-extra)  # negative: drop that many tokens (the meaning in every transformers 5.x)
        self._prefix = None  # consumed: a failure below must not leave a half-updated cache behind
        suffix_blocks = [b for b, (s, _, _) in zip(blocks, spans) if s >= P]
        dev = self.model.device
        x, mask, p = ids[:, P:].to(dev), torch.ones_like(ids).to(dev), pos[:, :, P:].to(dev)
        if suffix_blocks and not _accepts_encoder_outputs(self.model.base):
            logits, cache = _prefill_from_features(self.model, x, mask, p, cache, suffix_blocks)
        else:
            enc = {"mm_encoder_outputs": _encoder_outputs(suffix_blocks)} if suffix_blocks else {}
            out = self.model.base(input_ids=x, attention_mask=mask, position_ids=p, past_key_values=cache,
                                  use_cache=True, logits_to_keep=1, **enc)
            logits, cache = out.logits[:, -1], out.past_key_values
        self._stats["reused_tokens"] += P
        self._stats["prefill_tokens"] += ids.shape[1] - P
        return logits, cache, P

    # ------------------------------------------------------------------------------------------- 6. decode
    def _decode(self, ids, pos, logits, cache, stop: list[str] | None):
        bb, tok = self.model.backbone, self.model.processor.tokenizer
        end_ids = set(bb.eos_ids)
        for t in ("<|im_start|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid >= 0:
                end_ids.add(tid)
        call_open, call_close = tok.convert_tokens_to_ids("<tool_call>"), tok.convert_tokens_to_ids("</tool_call>")
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        dev = self.model.device
        nxt = pos[:, 0, -1].max() + 1
        seq, new, reason, after_call = ids.to(dev), [], "length", False
        for step in range(self.max_new_tokens):
            scores = logits.float()
            if self.logits_processor is not None:
                scores = self.logits_processor(seq, scores)
            if self.temperature > 0:
                probs = torch.softmax(scores / self.temperature, -1)
                t = int(torch.multinomial(probs.cpu(), 1, generator=gen))
            else:
                t = int(scores.argmax(-1))
            if t in end_ids:
                reason = "eos"
                break
            if after_call and t != call_open and tok.decode([t]).strip():
                reason = "tool_call_end"  # text after </tool_call> that opens no new call: a stop-token bug
                break
            after_call = self.stop_after_tool_call and (t == call_close or (after_call and t != call_open))
            new.append(t)
            if stop and any(s in tok.decode(new) for s in stop):
                reason = "stop"
                break
            if step == self.max_new_tokens - 1:
                break
            seq = torch.cat([seq, torch.tensor([[t]], device=dev)], 1)
            p = torch.full((3, 1, 1), float(nxt + len(new) - 1), dtype=pos.dtype, device=dev)
            out = self.model.base(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), position_ids=p,
                                  past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        fed = new if reason in ("eos", "tool_call_end") else new[:-1]  # tokens whose KV the cache holds
        fed_ids = torch.tensor([fed], dtype=torch.long)
        cached_ids = torch.cat([ids, fed_ids], 1)
        cached_pos = torch.cat([pos, (nxt + torch.arange(len(fed))).to(pos.dtype).view(1, 1, -1).expand(3, 1, -1)],
                               2) if fed else pos
        text = tok.decode(new, skip_special_tokens=True)
        if reason == "stop":
            cut = min(text.find(s) for s in stop if s in text)
            text = text[:cut]
        return text, len(new), reason, (cached_ids, cached_pos.cpu(), cache)

    # ------------------------------------------------------------------------------------------- the call
    def _generate(self, messages, stop=None, run_manager=None, tools=None, tool_choice=None, **kwargs) -> ChatResult:
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            self._stats["calls"] += 1
            text, entries = self.render(messages, None if tool_choice == "none" else tools)
            blocks = self._encode(entries)
            ids = self._tokenize(text, blocks)
            aligned_before = aligned_stats(self.model.base)["aligned"]
            pos = self._positions(ids, blocks)
            aligned = aligned_stats(self.model.base)["aligned"] - aligned_before
            spans = _image_spans(ids, self.model.backbone.image_token_id, entries)
            logits, cache, reused = self._prefill(ids, pos, blocks, spans)
            out_text, n_new, reason, (c_ids, c_pos, cache) = self._decode(ids, pos, logits, cache, stop)
            self._prefix = _Prefix(c_ids, c_pos, spans, cache)
            self._trace = {"input_ids": ids, "position_ids": pos.cpu(), "image_spans": spans,
                               "image_ids": [e.id for e in entries], "grids": [b.grid_hw for b in blocks],
                               "reused_tokens": reused, "text": out_text}
        content, calls, invalid = parse_tool_calls(out_text)
        L = ids.shape[1]
        meta = {"model_name": self._llm_type, "prompt_tokens": L, "completion_tokens": n_new,
                "reused_prefix_tokens": reused, "images": len(blocks),
                "visual_tokens": sum(b.num_tokens for b in blocks), "aligned_crops": aligned,
                "stop_reason": reason, "latency_s": round(time.perf_counter() - t0, 4)}
        msg = AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid, response_metadata=meta,
                        usage_metadata={"input_tokens": L, "output_tokens": n_new, "total_tokens": L + n_new})
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _image_spans(ids: torch.Tensor, image_token_id: int, entries: list) -> list[tuple[int, int, str]]:
    """(start, end, content key) of each image's pad run, in order."""
    flags = (ids[0] == image_token_id).tolist() + [False]
    spans, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            spans.append((start, i))
            start = None
    return [(s, e, entry.key()) for (s, e), entry in zip(spans, entries)]


def _accepts_encoder_outputs(hf_model) -> bool:
    """Whether the inner Qwen-VL model's forward takes precomputed vision features (`mm_encoder_outputs`): transformers
    5.23 does; 5.17 does not and silently drops the unknown keyword (the images would never reach the LM)."""
    return "mm_encoder_outputs" in inspect.signature(type(find_cores(hf_model)[0]).forward).parameters


def _prefill_from_features(model, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
                           blocks: list):
    """The prefill the HF forward does with `mm_encoder_outputs`, for transformers without it (5.17): image pads'
    embeddings replaced by the blocks' features, DeepStack levels (Qwen3-VL) handed to the language model, last
    position's logits. Returns (logits (1, vocab), cache)."""
    bb = model.backbone
    core = find_cores(model.base)[0]
    embeds = bb.embed(ids)
    visual = ids == bb.image_token_id
    feats = torch.cat([b.embeds for b in blocks]).to(embeds.device, embeds.dtype)
    if int(visual.sum()) != feats.shape[0]:
        raise ValueError(f"{int(visual.sum())} image tokens but {feats.shape[0]} visual features")
    embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), feats)
    deep = {}
    if blocks[0].deepstack is not None:
        deep = {"visual_pos_masks": visual,
                "deepstack_visual_embeds": [torch.cat([b.deepstack[lv] for b in blocks]).to(embeds.device)
                                            for lv in range(len(blocks[0].deepstack))]}
    out = core.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True, **deep)
    return bb.logits(out.last_hidden_state[:, -1:])[:, -1], out.past_key_values


def _encoder_outputs(blocks: list) -> dict:
    """Precomputed vision features in the form the HF Qwen-VL forward accepts (`mm_encoder_outputs`)."""
    embeds = tuple(b.embeds for b in blocks)
    if blocks[0].deepstack is None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=embeds)}
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    levels = len(blocks[0].deepstack)
    deep = [tuple(b.deepstack[lv] for b in blocks) for lv in range(levels)]
    return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=embeds, deepstack_features=deep)}


class ScriptedPolicy:
    """A LogitsProcessor that makes any model write `turns[i]` on its i-th assistant turn (demos, tests, CI).

    The turn is the number of `<|im_start|>assistant` headers in the prompt minus one; after the script's last
    token it forces <|im_end|>. Turns past the end repeat the last script (a policy that never stops, if it calls).
    """

    def __init__(self, tokenizer, turns: list[str]) -> None:
        self.tok = getattr(tokenizer, "tokenizer", tokenizer)
        self.scripts = [self.tok(t, add_special_tokens=False)["input_ids"] for t in turns]
        self.im_start = self.tok.convert_tokens_to_ids("<|im_start|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.header = self.tok("assistant\n", add_special_tokens=False)["input_ids"]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = input_ids[0].tolist()
        n, h = 0, len(self.header)
        last = None
        for i, t in enumerate(ids):
            if t == self.im_start and ids[i + 1:i + 1 + h] == self.header:
                n, last = n + 1, i + 1 + h
        script = self.scripts[min(max(n - 1, 0), len(self.scripts) - 1)]
        done = len(ids) - (last if last is not None else len(ids))
        target = script[done] if done < len(script) else self.im_end
        forced = torch.full_like(scores, float("-inf"))
        forced[..., target] = 0.0
        return forced
