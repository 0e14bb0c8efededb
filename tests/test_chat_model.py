"""QZoomChatModel: parsing, rendering, aligned fusion of tool crops, vision/prefix caches, stop handling.

Tiny random Qwen2.5-VL / Qwen3-VL; a ScriptedPolicy logits processor writes the policy's text.
"""
from __future__ import annotations

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from test_graph_support import one_thread, call, rig_score_map, scene, tiny_qzoom  # noqa: F401 (one_thread: fixture)

from qzoom_agent.aligned_positions import parse_zoom_markers
from qzoom_agent.chat_model import QZoomChatModel, ScriptedPolicy, parse_tool_calls
from qzoom_agent.fusion import ImageSlot, roi_position_ids, sequence_position_ids
from qzoom_agent.observations import image_block
from qzoom_agent.tool import make_zoom_tool

QUESTION = "What is on the red tag?"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family_qz(request):
    return request.param, tiny_qzoom(request.param)


@pytest.fixture(scope="module")
def qz():
    return tiny_qzoom()


class Recorder:
    """Wraps a logits processor and keeps the raw scores of every step (before forcing)."""

    def __init__(self, inner):
        self.inner, self.scores = inner, []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        return self.inner(input_ids, scores)


def chat_for(model, turns, **kw) -> QZoomChatModel:
    return QZoomChatModel(model=model, logits_processor=ScriptedPolicy(model.processor, turns), max_new_tokens=80, **kw)


def tools_round(model, messages):
    """Run the real zoom tool on the last AI message's calls; returns the messages with the ToolMessages."""
    g = StateGraph(MessagesState)
    g.add_node("tools", ToolNode([make_zoom_tool(model)]))
    g.add_edge(START, "tools")
    return g.compile().invoke({"messages": messages})["messages"]


def zoom_round(model, messages, args, call_id):
    """Append an AI zoom call and the real tool's ToolMessage to `messages`."""
    return tools_round(model, [*messages, AIMessage(content="", tool_calls=[{"name": "zoom", "args": args,
                                                                             "id": call_id}])])


def start(image=None) -> list:
    return [HumanMessage(content=[image_block(image or scene()), {"type": "text", "text": QUESTION}])]


# ----------------------------------------------------------------------------------------------- parsing

def test_parse_tool_calls_valid_and_invalid():
    text = "<think>look</think>\n" + call("zoom", query="tag", k=2) + "\n" + call("zoom", source="z1")
    content, calls, invalid = parse_tool_calls(text)
    assert content == "<think>look</think>" and not invalid
    assert [(c["name"], c["args"]) for c in calls] == [("zoom", {"query": "tag", "k": 2}), ("zoom", {"source": "z1"})]
    assert len({c["id"] for c in calls}) == 2
    cases = {
        '<tool_call>\n{"name": "zoom", "arguments": {"query": "tag"}\n</tool_call>': "malformed JSON",
        '<tool_call>{"arguments": {}}</tool_call>': '"name"',
        '<tool_call>{"name": "zoom", "arguments": [1, 2]}</tool_call>': "JSON object",
        '<tool_call>{"name": "zoom", "arguments": "{bad"}</tool_call>': "not valid JSON",
        'answer <tool_call>\n{"name": "zoom", "argu': "unterminated",
    }
    for text, why in cases.items():
        content, calls, invalid = parse_tool_calls(text)
        assert not calls and len(invalid) == 1 and why in invalid[0]["error"], text
    assert parse_tool_calls('answer <tool_call>\n{"name": "zoom", "argu')[0] == "answer"
    assert parse_tool_calls(list(cases)[0])[2][0]["name"] == "zoom"  # name recovered for the error message
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "zoom", "arguments": "{\\"k\\": 2}"}</tool_call>')
    assert calls[0]["args"] == {"k": 2}


# ----------------------------------------------------------------------------------------------- rendering

def test_tokens_match_the_processor(qz):
    img = scene()
    chat = QZoomChatModel(model=qz)
    text, entries = chat.render(start(img), tools=[make_zoom_tool(qz)])
    ids = chat._tokenize(text, chat._encode(entries))
    cell = qz.backbone.cell_px
    ref = qz.processor(text=[text], images=[img], return_tensors="pt",
                       size={"shortest_edge": 16 * cell * cell, "longest_edge": 64 * cell * cell})
    assert torch.equal(ids, ref["input_ids"])
    assert '"name": "zoom"' in text and "<tools>" in text


def test_markers_are_rederived_for_each_rendering(qz, monkeypatch):
    rig_score_map(monkeypatch, qz)
    messages = zoom_round(qz, start(), {"query": "tag"}, "c1")
    tool_msg = messages[-1]
    cells = tuple(tool_msg.artifact["regions"][0]["box_cells"])
    stale = tool_msg.model_copy(update={"content": [tool_msg.content[0], {
        "type": "text", "text": tool_msg.content[1]["text"].replace("src=0", "src=7")}]})
    chat = QZoomChatModel(model=qz)
    text, _ = chat.render([*messages[:-1], stale])
    assert parse_zoom_markers(text) == [(0, cells)]  # the source's index in this rendering, written once
    orphan = [HumanMessage("no image here"), messages[1], stale]  # the source image was trimmed away
    text, entries = chat.render(orphan)
    assert parse_zoom_markers(text) == [] and [e.id for e in entries] == ["z1"]


# ----------------------------------------------------------------------------------------------- one call

def test_scripted_tool_call(qz):
    chat = chat_for(qz, [call("zoom", query="the red tag", k=2)])
    ai = chat.bind_tools([make_zoom_tool(qz)]).invoke(start())
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("zoom", {"query": "the red tag", "k": 2})]
    assert ai.content == "" and not ai.invalid_tool_calls
    meta = ai.response_metadata
    assert meta["stop_reason"] == "eos" and meta["images"] == 1 and meta["prompt_tokens"] > meta["visual_tokens"] > 0
    assert ai.usage_metadata["output_tokens"] == meta["completion_tokens"] > 0


def test_fused_crop_positions_follow_roi_position_ids(family_qz, monkeypatch):
    family, qz = family_qz
    rig_score_map(monkeypatch, qz)
    messages = zoom_round(qz, start(scene(900, 640)), {"query": "tag"}, "c1")
    messages = zoom_round(qz, messages, {"query": "code", "source": "z1"}, "c2")
    chat = chat_for(qz, ["<answer>A</answer>"])
    ai = chat.invoke(messages)
    assert ai.content == "<answer>A</answer>" and ai.response_metadata["aligned_crops"] == 2
    tr = chat.last_trace
    ids, pos = tr["input_ids"][0], tr["position_ids"][:, 0]
    (s0, _, _), (s1, e1, _), _ = tr["image_spans"]
    g0, g1, g2 = tr["grids"]
    cells1 = tuple(messages[2].artifact["regions"][0]["box_cells"])
    cells2 = tuple(messages[4].artifact["regions"][0]["box_cells"])
    start_id = float(pos[0, s0])
    assert torch.equal(pos[:, s1:e1], roi_position_ids(start_id, g0, cells1, g1))  # the crop sits on its source
    expected = sequence_position_ids(ids, qz.backbone.image_token_id,
                                     [ImageSlot(g0), ImageSlot(g1, 0, cells1), ImageSlot(g2, 1, cells2)])
    assert torch.equal(pos, expected)  # the crop of the crop interpolates over z1's fractional ids


def test_second_turn_reuses_vision_and_prefix(family_qz, monkeypatch):
    family, qz = family_qz
    rig_score_map(monkeypatch, qz)
    encoded = []
    real_encode = qz.backbone.encode_images

    def counting(images, *a, **k):
        encoded.append([im.size for im in images])
        return real_encode(images, *a, **k)

    monkeypatch.setattr(qz.backbone, "encode_images", counting)
    img = scene(640, 480)
    rec = Recorder(ScriptedPolicy(qz.processor, [call("zoom", query="tag"), "<answer>A</answer>"]))
    chat = QZoomChatModel(model=qz, logits_processor=rec, max_new_tokens=80)
    llm = chat.bind_tools([make_zoom_tool(qz)])
    messages = [*start(img)]
    ai = llm.invoke(messages)
    assert encoded == [[img.size]]
    messages = tools_round(qz, [*messages, ai])
    crop_size = tuple(messages[-1].artifact["regions"][0]["crop_wh"])
    encoded.clear()
    n_steps = len(rec.scores)
    ai2 = llm.invoke(messages)
    assert encoded == [[crop_size]]  # the global image is not re-encoded: only the new crop goes through the ViT
    assert chat.stats["images_cached"] >= 1
    reused = ai2.response_metadata["reused_prefix_tokens"]
    assert reused >= ai.response_metadata["prompt_tokens"]  # turn 1's prompt and the call it wrote
    fresh_rec = Recorder(ScriptedPolicy(qz.processor, [call("zoom", query="tag"), "<answer>A</answer>"]))
    fresh = QZoomChatModel(model=qz, logits_processor=fresh_rec, max_new_tokens=80, reuse_prefix=False)
    assert fresh.bind_tools([make_zoom_tool(qz)]).invoke(messages).content == ai2.content == "<answer>A</answer>"
    for a, b in zip(rec.scores[n_steps:], fresh_rec.scores):
        assert torch.allclose(a, b, atol=1e-4)  # reusing the prefix KV changes nothing


# ----------------------------------------------------------------------------------------------- stopping

def test_stop_handling(qz):
    msgs = start()
    ai = chat_for(qz, [call("zoom", query="tag") + " and then I keep talking"]).invoke(msgs)
    assert ai.response_metadata["stop_reason"] == "tool_call_end" and len(ai.tool_calls) == 1 and ai.content == ""
    ai = chat_for(qz, [call("zoom", query="a") + "\n" + call("zoom", query="b")]).invoke(msgs)
    assert [c["args"]["query"] for c in ai.tool_calls] == ["a", "b"]  # parallel calls may follow one another
    ai = chat_for(qz, ["The tag says A<|im_start|>user\nmore"]).invoke(msgs)
    assert ai.content == "The tag says A" and ai.response_metadata["stop_reason"] == "eos"
    ai = chat_for(qz, ["hello STOP world"]).invoke(msgs, stop=["STOP"])
    assert ai.content == "hello" and ai.response_metadata["stop_reason"] == "stop"
    short = QZoomChatModel(model=qz, logits_processor=ScriptedPolicy(qz.processor, [call("zoom", query="the tag")]),
                           max_new_tokens=8)
    ai = short.invoke(msgs)
    assert ai.response_metadata["stop_reason"] == "length" and not ai.tool_calls
    assert "unterminated" in ai.invalid_tool_calls[0]["error"]


def test_tool_choice_none_hides_tools_and_invalid_calls_render_back(qz):
    chat = QZoomChatModel(model=qz)
    bad = AIMessage(content="", invalid_tool_calls=[{"name": "zoom", "args": '{"name": "zoom", "arg',
                                                     "id": "x", "error": "malformed", "type": "invalid_tool_call"}])
    err = ToolMessage(content="Error: malformed", tool_call_id="x", status="error")
    text, _ = chat.render([*start(), bad, err], tools=None)
    assert "<tools>" not in text and '<tool_call>\n{"name": "zoom", "arg\n</tool_call>' in text
    assert "<tool_response>\nError: malformed\n</tool_response>" in text


# ----------------------------------------------------------------------------------------------- vision features

def test_images_reach_the_language_model(family_qz):
    """The prefill feeds the images' features to the LM on every supported transformers (5.17's forward has no
    `mm_encoder_outputs` and silently drops it): two different images give different first-step scores."""
    _, qz = family_qz
    scores = []
    for img in (scene(640, 480), scene(640, 480, seed=1)):
        rec = Recorder(ScriptedPolicy(qz.processor, ["<answer>A</answer>"]))
        QZoomChatModel(model=qz, logits_processor=rec, max_new_tokens=3).invoke(start(img))
        scores.append(rec.scores[0])
    assert not torch.allclose(scores[0], scores[1], atol=1e-3)


def test_prefill_from_features_equals_the_hf_forward(family_qz, monkeypatch):
    """The prefill used where the HF forward lacks `mm_encoder_outputs` (transformers 5.17) gives the same scores
    as the HF forward, also over a reused prefix with a new crop (on 5.17 both runs take that prefill)."""
    import qzoom_agent.chat_model as cm

    _, qz = family_qz
    rig_score_map(monkeypatch, qz)

    def run():
        rec = Recorder(ScriptedPolicy(qz.processor, [call("zoom", query="tag"), "<answer>A</answer>"]))
        llm = QZoomChatModel(model=qz, logits_processor=rec, max_new_tokens=80).bind_tools([make_zoom_tool(qz)])
        messages = start(scene(640, 480))
        ai = llm.invoke(messages)
        ai2 = llm.invoke(tools_round(qz, [*messages, ai]))
        return ai2.content, ai2.response_metadata["reused_prefix_tokens"], rec.scores

    ref = run()
    used = []
    real = cm._prefill_from_features
    monkeypatch.setattr(cm, "_accepts_encoder_outputs", lambda hf: False)
    monkeypatch.setattr(cm, "_prefill_from_features", lambda *a: used.append(len(a[-1])) or real(*a))
    got = run()
    assert used == [1, 1]                              # turn 1: the global image; turn 2: only the new crop
    assert got[:2] == ref[:2] and got[1] > 0 and len(got[2]) == len(ref[2])
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
