#!/usr/bin/env python
"""Cold start for RL: SynthHR agent traces, and a short SFT on them so the policy emits valid `zoom` calls.

    python tools/make_agent_traces.py --model testbed --n 2000 --out runs/agent_traces
    python tools/make_agent_traces.py --model testbed --n 2000 --out runs/agent_traces \\
        --sft_steps 300 --sft_output runs/sft_policy    # then: rl/train_grpo.py --model_name_or_path runs/sft_policy

A trace is the conversation inference runs (system prompt and tools of the agent, the item's eval prompt):
  needs_hr item:  user(image, prompt) → assistant zoom(query) → tool(crop, `<zoom src=0 cells=...>`, line)
                  → assistant `<answer>X</answer>`
  coarse item:    user(image, prompt) → assistant `<answer>X</answer>`
The crop comes from the real tool through the RL environment (rl/env.py → qzoom_agent.tool.zoom_observation); when
its proposal misses the item's evidence box (coverage < --min_coverage, e.g. untrained heads) the oracle box is used
instead through the box tool's core (same observation format), and `crop_source` says which. `--tool deepeyes`
writes the comparison agent's traces: `image_zoom_in_tool(bbox_2d)` with the evidence box padded by 25 %.

Written as `traces.jsonl` (messages with `{"type": "image"}` placeholders + `images`: PNG paths in order) and
`images/`, or as a datasets parquet (`--format parquet`, PIL images). The SFT is a plain loop (assistant tokens
only, the vision tower and the RoI head's input layers frozen as in RL) over `model(**batch)`, where the installed
seam fuses every crop on its source grid. Each trace is rendered with the tool schema TRL builds (rl/env.py) or the
one the LangGraph agent builds (LangChain), alternately, so the policy follows either prompt.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402
from qzoom_agent.errors import QZoomError  # noqa: E402


@dataclass
class TraceArgs:
    model: str = field(default="testbed", metadata={"help": "testbed | tiny-random | QZoomModel folder"})
    out: str = field(default="runs/agent_traces", metadata={"help": "output folder"})
    n: int = field(default=2000, metadata={"help": "traces to write (0: use existing ones in --out)"})
    start: int = field(default=1_000_000, metadata={"help": "SynthHR stream position (disjoint from RL's 0..)"})
    subsets: str = field(default="", metadata={"help": "comma-separated SynthHR subsets (empty: all)"})
    scale: str = "mini"
    n_candidates: int | None = field(default=None, metadata={
        "help": "SynthHR level: objects of the asked kind (1: single candidate; empty: each subset's default)"})
    budget_tokens: int = field(default=256, metadata={"help": "visual budget (as rl/train_grpo.py)"})
    needs_hr_budget: int | None = field(default=None, metadata={"help": "needs_hr@B label (default budget)"})
    format: str = field(default="jsonl", metadata={"help": "jsonl | parquet"})
    min_coverage: float = field(default=0.5, metadata={"help": "tool crop must cover this share of the evidence"})
    crop_source: str = field(default="tool_or_oracle", metadata={"help": "tool | oracle | tool_or_oracle"})
    init_heads: bool = False
    tool: str = field(default="zoom", metadata={"help": "zoom (ours) | deepeyes (image_zoom_in_tool, oracle boxes)"})
    query: str = field(default="question", metadata={
        "help": "zoom's query in the traces: question (the item's question) | none (no argument: the tool then uses "
                "the question; easiest for small policies)"})
    answer_format: str = field(default="tagged", metadata={
        "help": "tagged (`<answer>X</answer>`, the agent's prompt) | bare (`X`: the answer where a policy that never "
                "saw the tags already answers; the testbed, whose answers the tags displace)"})
    fuse_crops: bool = field(default=True, metadata={"help": "keep the crop marker (as the RL run will)"})
    size_hint: bool = field(default=False, metadata={"help": "deepeyes: image size in the prompt (as the RL run)"})
    sft_steps: int = field(default=0, metadata={"help": "SFT optimiser steps (0: traces only)"})
    sft_output: str = "runs/sft_policy"
    sft_lr: float = 1e-4
    sft_batch: int = 8
    sft_use_peft: bool = False
    sft_head_steps: int = field(default=0, metadata={
        "help": "steps that train the output projection (lm_head) alone before the SFT proper (LP-FT: the new "
                "format tokens start at ~28 nats, and their gradients overwrite the features the answers need)"})
    sft_head_lr: float = 3e-3
    seed: int = 0
    device: str = "auto"
    eval_n: int = field(default=32, metadata={"help": "held-out items for the post-SFT format check"})
    cpu_threads: int | None = None
    workers: int = field(default=0, metadata={
        "help": "processes rendering SynthHR rows, and encoding SFT batches, while the model runs"})
    max_malformed_rate: float = field(default=-1.0, metadata={
        "help": "after the SFT, run another round of --sft_steps while the format check's malformed_call_rate on "
                "needs_hr items is above this (second GPU run: three calls in four malformed after 180 steps); "
                "< 0: off"})
    sft_rounds: int = field(default=1, metadata={"help": "at most this many SFT rounds (each a fresh schedule)"})
    max_accuracy_drop: float = field(default=-1.0, metadata={
        "help": "fail (exit 2, nothing saved) when the SFT lowers direct-answer accuracy on coarse items by more "
                "than this (0.1 = 10 points); < 0: only warn"})


# ------------------------------------------------------------------------------------------------ traces

def box_coverage(box, evidence) -> float:
    """Share of the evidence box inside `box` (both x0, y0, x1, y1 px)."""
    ix = max(0, min(box[2], evidence[2]) - max(box[0], evidence[0]))
    iy = max(0, min(box[3], evidence[3]) - max(box[1], evidence[1]))
    area = max(1, (evidence[2] - evidence[0]) * (evidence[3] - evidence[1]))
    return ix * iy / area


def check_answer_format(answer_format: str) -> str:
    if answer_format not in ("tagged", "bare"):
        raise QZoomError(f"--answer_format must be tagged or bare, not {answer_format!r}")
    return answer_format


def answer_text(item: dict, answer_format: str = "tagged") -> str:
    check_answer_format(answer_format)
    return f"<answer>{item['answer']}</answer>" if answer_format == "tagged" else str(item["answer"])


def tool_call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def padded_box(box, image_wh, pad: float = 0.25, min_px: int = 56) -> list[int]:
    """The evidence box grown by `pad` of its size on each side (at least `min_px` wide/high), inside the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx, dy = max(pad * w, (min_px - w) / 2, 0), max(pad * h, (min_px - h) / 2, 0)
    W, H = image_wh
    return [int(max(0, x0 - dx)), int(max(0, y0 - dy)), int(min(W, x1 + dx + 0.5)), int(min(H, y1 + dy + 0.5))]


def rendered(rows, positions, workers: int = 0):
    """Rows at stream `positions`, in order; rendered by `workers` processes (a DataLoader) when > 0."""
    if workers <= 0:
        yield from (rows.row(k) for k in positions)
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(list(positions), batch_size=None, num_workers=workers, collate_fn=rows.row,
                          prefetch_factor=4)


def make_trace(qzoom, row: dict, args: TraceArgs) -> dict:
    """One trace record: messages with image placeholders, the images in order, and what was done.

    Everything runs through the RL environments (rl/env.py), so a trace is what a rollout of the same policy would be.
    """
    from rl.env import EnvContext, make_env_factory, tool_name

    item = json.loads(row["item"])
    ctx = EnvContext(qzoom, fuse_crops=args.fuse_crops, size_hint=args.size_hint)
    env = make_env_factory(ctx, args.tool)()
    hint = env.reset(**row)
    messages = [m if m["role"] != "user" else {**m, "content": list(m["content"])} for m in row["prompt"]]
    if hint:  # what TRL does with reset()'s text: appended to the last user message
        messages[-1]["content"].append({"type": "text", "text": hint})
    images = list(row["images"])
    rec = {"needs_hr": row["needs_hr"], "subset": row["subset"], "item": row["item"], "crop_source": None,
           "tool": args.tool}
    if row["needs_hr"]:
        oracle = padded_box(item["evidence_union"], images[0].size)
        content, source, call = None, None, None
        zoom_args = {"query": item["question"]} if args.query == "question" else {}
        if args.tool == "zoom" and args.crop_source in ("tool", "tool_or_oracle"):
            call = zoom_args
            try:
                content, source = env.zoom(**call), "tool"
                cov = box_coverage(env.log.regions[0]["root_box_px"], item["evidence_union"])
                if cov < args.min_coverage and args.crop_source == "tool_or_oracle":
                    content = None
            except Exception:
                content = None
        if content is None and args.tool == "zoom":  # the oracle crop, through the box tool's core
            box_env = make_env_factory(ctx, "deepeyes")()
            box_env.reset(**row)
            content, source, call = box_env.image_zoom_in_tool(bbox_2d=oracle), "oracle", zoom_args
        elif content is None:
            call = {"bbox_2d": oracle}
            content, source = env.image_zoom_in_tool(**call), "oracle"
        images += [b["image"] for b in content if b["type"] == "image"]
        tool_msg = {"role": "tool", "name": tool_name(args.tool),
                    "content": [{"type": "image"} if b["type"] == "image" else b for b in content]}
        messages += [tool_call(tool_name(args.tool), call), tool_msg]
        rec["crop_source"] = source
    messages.append({"role": "assistant", "content": answer_text(item, args.answer_format)})
    rec.update(messages=messages, images=images)
    return rec


def write_traces(records: list[dict], out: Path, fmt: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        from datasets import Dataset

        rows = [{**r, "messages": json.dumps(r["messages"])} for r in records]
        path = out / "traces.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
        return path
    (out / "images").mkdir(exist_ok=True)
    path = out / "traces.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(records):
            names = []
            for j, im in enumerate(r["images"]):
                name = f"images/{i:06d}_{j}.png"
                im.save(out / name, compress_level=1)
                names.append(name)
            f.write(json.dumps({**r, "images": names}) + "\n")
    return path


def read_traces(out: Path) -> list[dict]:
    """Records with PIL images back (jsonl + images/ or parquet)."""
    from PIL import Image

    if (out / "traces.parquet").exists():
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(out / "traces.parquet"), split="train")
        return [{**r, "messages": json.loads(r["messages"])} for r in ds]
    records = []
    for line in (out / "traces.jsonl").read_text().splitlines():
        r = json.loads(line)
        r["images"] = [Image.open(out / p).convert("RGB") for p in r["images"]]
        records.append(r)
    return records


def with_images(messages: list[dict], images: list) -> list[dict]:
    """Fill `{"type": "image"}` placeholders with the images, in order."""
    it = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": next(it)} if b.get("type") == "image" else b for b in content]
        out.append({**m, "content": content})
    return out


# ------------------------------------------------------------------------------------------------ SFT

def tool_schemas(qzoom, kind: str = "zoom") -> list[list[dict]]:
    """The tool's schema as TRL renders it (from rl/env.py) and as the LangGraph agent renders it (LangChain)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from transformers.utils import get_json_schema

    from qzoom_agent.bbox_tool import make_bbox_tool
    from qzoom_agent.tool import make_zoom_tool
    from rl.env import EnvContext, make_env_factory, tool_name

    method = getattr(make_env_factory(EnvContext(qzoom), kind)(), tool_name(kind))
    lc_tool = make_zoom_tool(qzoom) if kind == "zoom" else make_bbox_tool(qzoom)
    return [[get_json_schema(method)], [convert_to_openai_tool(lc_tool)]]


def assistant_mask(input_ids: torch.Tensor, tok) -> torch.Tensor:
    """True on the tokens of assistant turns (after `<|im_start|>assistant\\n`, through `<|im_end|>`)."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    head = tok.encode("assistant\n", add_special_tokens=False)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        i = 0
        while i < len(row):
            if row[i] == start and row[i + 1:i + 1 + len(head)] == head:
                j = i + 1 + len(head)
                while j < len(row) and row[j] != end:
                    j += 1
                mask[b, i + 1 + len(head):min(j + 1, len(row))] = True
                i = j
            i += 1
    return mask


def encode_batch(qzoom, records: list[dict], schemas: list[dict]) -> dict:
    convs = [with_images(r["messages"], r["images"]) for r in records]
    return qzoom.processor.apply_chat_template(convs, tools=schemas, tokenize=True, return_dict=True,
                                               return_tensors="pt", processor_kwargs={"padding": True})


def sft(qzoom, records: list[dict], args: TraceArgs, log=print) -> list[float]:
    """Assistant-token cross-entropy over the traces; the seam places every crop on its source grid.

    With `--sft_head_steps` it runs as linear probing then fine-tuning (LP-FT, Kumar et al. 2022): the testbed has
    never emitted `<answer>` or `<tool_call>` (loss ~28 nats a token), and fine-tuning everything against such a
    head distorts the features its answers rely on (first GPU run: accuracy halved). The head alone learns the format
    tokens first; the body then moves with small losses.
    """
    from qzoom_agent.aligned_positions import install_aligned_positions

    model, tok = qzoom.base, qzoom.processor.tokenizer
    install_aligned_positions(model, tok)
    schemas, rng, losses = tool_schemas(qzoom, args.tool), random.Random(args.seed), []
    if args.sft_head_steps:
        model.requires_grad_(False)
        head = model.get_output_embeddings()
        head.requires_grad_(True)
        losses += _sft_loop(qzoom, model, list(head.parameters()), records, schemas, rng, args.sft_head_steps,
                            args.sft_head_lr, args.sft_batch, log, "head", args.workers)
        model.requires_grad_(True)
    if args.sft_use_peft:
        from peft import LoraConfig, get_peft_model

        from rl.train_grpo import LM_LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LM_LORA_TARGETS))
    else:
        model.model.visual.requires_grad_(False)
        model.model.language_model.embed_tokens.requires_grad_(False)
        for layer in qzoom.backbone.layers[:qzoom.config.twig_K]:
            layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    losses += _sft_loop(qzoom, model, params, records, schemas, rng, args.sft_steps, args.sft_lr, args.sft_batch,
                        log, "sft", args.workers)
    model.eval()
    if args.sft_use_peft:
        qzoom.base = model.merge_and_unload()
    return losses


def _sft_loop(qzoom, model, params, records, schemas, rng, steps: int, lr: float, batch_size: int, log,
              name: str, workers: int = 0) -> list[float]:
    """AdamW over `params` for `steps` batches (10-step warm-up, cosine decay); the per-step losses.

    Batches are drawn up front (same draws whatever `workers`) and encoded by `workers` processes while the model
    trains: the processor, not the model, bounds a step of this small policy."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    tok, device = qzoom.processor.tokenizer, qzoom.device
    use_bf16 = device.type == "cuda"
    draws = [(step, rng.sample(range(len(records)), min(batch_size, len(records)))) for step in range(steps)]
    model.train()
    losses = []
    for step, enc in enumerate(_encoded(qzoom, records, schemas, draws, workers)):
        x = {k: v.to(device) for k, v in enc.items()}
        labels = x["input_ids"].masked_fill(~assistant_mask(x["input_ids"], tok).to(device), -100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {losses[-1]:.4f}")
    return losses


def _encoded(qzoom, records, schemas, draws, workers: int):
    """`encode_batch` of each (step, record indices) draw, in order; in `workers` processes when > 0."""
    def encode(draw):
        step, idx = draw
        return encode_batch(qzoom, [records[i] for i in idx], schemas[step % 2])

    if workers <= 0:
        yield from map(encode, draws)
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(draws, batch_size=None, num_workers=workers, collate_fn=encode, prefetch_factor=4,
                          multiprocessing_context="fork")


@torch.no_grad()
def format_check(qzoom, rows: list[dict], args: TraceArgs, max_new_tokens: int = 64) -> dict:
    """Greedy first turn on held-out rows: does the policy call its tool (validly) on needs_hr items and answer
    coarse ones directly, and are its direct answers still right? (`direct_accuracy`: the eval's score of the
    first turn on the items answered without a tool call; run before and after the SFT, it shows whether the cold
    start cost the policy its answers, as the first GPU run's did: eval/results/rl_testbed_h100_partial.)"""
    from trl.chat_template_utils import add_response_schema

    from rl.env import EnvContext, make_env_factory, tool_name
    from rl.rewards import looks_like_tool_call, score_answer

    tok = qzoom.processor.tokenizer
    add_response_schema(qzoom.processor)
    schema, name = tool_schemas(qzoom, args.tool)[0], tool_name(args.tool)
    env = make_env_factory(EnvContext(qzoom, size_hint=args.size_hint), args.tool)()
    counts = {"needs_hr": [0, 0, 0, 0], "coarse": [0, 0, 0, 0]}  # items, tool calls, direct answers, malformed calls
    scores: dict[str, list[float]] = {"needs_hr": [], "coarse": []}  # direct (no tool call) answers
    for row in rows:
        conv = with_images(row["prompt"], row["images"])
        hint = env.reset(**row)
        if hint:
            conv[-1]["content"].append({"type": "text", "text": hint})
        x = qzoom.processor.apply_chat_template(conv, tools=schema, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
        x = {k: v.to(qzoom.device) for k, v in x.items()}
        out = qzoom.base.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, x["input_ids"].shape[1]:].tolist()
        try:
            parsed = tok.parse_response(new, prefix=x["input_ids"][0].tolist())
        except Exception:
            parsed = {}
        calls = parsed.get("tool_calls") or []
        key = "needs_hr" if row["needs_hr"] else "coarse"
        counts[key][0] += 1
        counts[key][1] += int(any(c.get("function", {}).get("name") == name for c in calls))
        text = parsed.get("content") or tok.decode(new, skip_special_tokens=True)  # `<answer>` is plain text
        malformed = not calls and looks_like_tool_call(text)  # a call TRL cannot parse is no answer
        counts[key][3] += int(malformed)
        if not calls and not malformed:
            counts[key][2] += int("<answer>" in text or args.answer_format == "bare" and bool(text.strip()))
            scores[key].append(score_answer(row["item"], text))
    return {k: {"items": n, "tool_call_rate": c / n if n else None, "direct_answer_rate": a / n if n else None,
                "malformed_call_rate": m / n if n else None, "direct_answered": len(scores[k]),
                "direct_accuracy": sum(scores[k]) / len(scores[k]) if scores[k] else None}
            for k, (n, c, a, m) in counts.items()}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    from qzoom_agent.cli_args import parse_args
    from rl.data import SynthHRRows
    from rl.train_grpo import PolicyConfig, ScriptArguments, load_policy, match_processor_budget

    args = parse_args(TraceArgs, argv=argv)
    check_answer_format(args.answer_format)  # also used by the format check of a run with --n 0
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qzoom = load_policy(PolicyConfig(model_name_or_path=args.model),
                        ScriptArguments(budget_tokens=args.budget_tokens, init_heads=args.init_heads), str(out))
    match_processor_budget(qzoom.processor, qzoom)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    qzoom.to(device)
    subsets = [s for s in args.subsets.split(",") if s] or None
    rows = SynthHRRows(args.scale, subsets, args.start, args.needs_hr_budget or args.budget_tokens,
                       n_candidates=args.n_candidates)
    report = {"args": asdict(args)}
    t0 = time.perf_counter()
    if args.n:
        records = [make_trace(qzoom, row, args) for row in rendered(rows, range(args.n), args.workers)]
        path = write_traces(records, out, args.format)
        sources = [r["crop_source"] for r in records if r["crop_source"]]
        report["traces"] = {"path": str(path), "n": len(records), "zoom": len(sources),
                            "tool_crops": sources.count("tool"), "oracle_crops": sources.count("oracle"),
                            "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(report["traces"]))
    if args.sft_steps or args.sft_head_steps:
        records = read_traces(out)
        held_out = [rows.row(args.n + 10_000 + k) for k in range(args.eval_n)]
        report["format_check_before"] = format_check(qzoom, held_out, args)
        losses = sft(qzoom, records, args)
        check = format_check(qzoom, held_out, args)
        rounds = [{"steps": len(losses), "last_loss": losses[-1], "malformed": malformed_rate(check)}]

        def too_malformed() -> bool:
            return 0 <= args.max_malformed_rate < rounds[-1]["malformed"]

        while too_malformed() and len(rounds) < args.sft_rounds:
            print(f"SFT round {len(rounds)}: {rounds[-1]['malformed']:.2f} of needs_hr items got a malformed call "
                  f"> --max_malformed_rate {args.max_malformed_rate}: another {args.sft_steps} steps")
            more = sft(qzoom, records, replace(args, sft_head_steps=0, seed=args.seed + len(rounds)))
            losses += more
            check = format_check(qzoom, held_out, args)
            rounds.append({"steps": len(more), "last_loss": more[-1], "malformed": malformed_rate(check)})
        report["sft"] = {"steps": args.sft_steps, "head_steps": args.sft_head_steps, "first_loss": losses[0],
                         "last_loss": losses[-1], "rounds": rounds}
        if args.sft_head_steps:
            report["sft"]["head_last_loss"] = losses[args.sft_head_steps - 1]
        if too_malformed():
            print(f"WARNING: the call format is not learned: {rounds[-1]['malformed']:.2f} of needs_hr items got a "
                  f"malformed call after {len(rounds)} round(s) (more --sft_steps / --sft_rounds)")
        report["sft"]["format_learned"] = not too_malformed()
        report["format_check"] = check
        print(json.dumps({"before_sft": report["format_check_before"], "after_sft": report["format_check"]}))
        before, after = (report[k]["coarse"]["direct_accuracy"] for k in ("format_check_before", "format_check"))
        drop = before - after if before is not None and after is not None else 0.0
        report["sft"]["coarse_direct_accuracy_drop"] = drop
        if drop > max(0.1, args.max_accuracy_drop):
            print(f"WARNING: the cold start cost the policy its answers: direct accuracy on coarse items "
                  f"{before:.2f} -> {after:.2f} (lower --sft_lr, fewer --sft_steps, or --sft_use_peft)")
        if 0 <= args.max_accuracy_drop < drop:
            write_report(report, out)
            raise QZoomError(f"cold start refused: coarse direct accuracy fell by {drop:.2f} > --max_accuracy_drop "
                             f"{args.max_accuracy_drop} ({out / 'report.json'}); the policy was not saved")
        from qzoom_agent.aligned_positions import uninstall_aligned_positions

        uninstall_aligned_positions(qzoom.base)
        qzoom.save_pretrained(args.sft_output)
        report["sft"]["output"] = args.sft_output
    write_report(report, out)
    return report


def malformed_rate(check: dict) -> float:
    """Share of needs_hr items whose first turn was a tool call TRL cannot parse (0 when there were none)."""
    return check["needs_hr"].get("malformed_call_rate") or 0.0


def write_report(report: dict, out: Path) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    try:
        main()
    except QZoomError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
