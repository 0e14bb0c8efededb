"""Evaluate methods × budgets × suites and write records, a summary, a report and Pareto plots.

    python eval/run_eval.py --suite synthhr-mini --split dev --methods base@256,oracle-crop@256 \
        --model runs/tiny_model --out runs/eval_dev
    python eval/run_eval.py --config eval/configs/testbed_test.yaml

Methods (one small class each, see METHODS): base@N (plain MLLM at a max visual-token budget N),
qzoom@N (gate → RoI → fused answer), oracle-crop@N (the GT evidence box fused: an upper bound),
full (native resolution), and the LangGraph agent with the learned zoom or DeepEyes' box tool
(agent-qzoom@N, agent-bbox@N; turns, tool calls, invalid calls, tokens and latency per item).

Resumable: records are appended to records.jsonl one item at a time; a killed run restarts where it
stopped, with no duplicated records. summary.json, report.md and the PNGs are written atomically.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from eval.benchmarks import ImageDecodeError, get_loader  # noqa: E402
from eval.benchmarks.synthhr import doc_ground_truth  # noqa: E402
from eval.costs import prefill_flops  # noqa: E402
from eval.report import write_report  # noqa: E402


@dataclass
class EvalArgs:
    suite: str = field(default="synthhr-mini", metadata={"help": "synthhr-mini | synthhr-full | a benchmark name "
                                                                  "(vstar, hrbench4k, docvqa, ...) with --data"})
    split: str = field(default="dev", metadata={"help": "SynthHR split: dev | test | tp"})
    data: str | None = field(default=None, metadata={"help": "local file/folder of a real benchmark or a manifest"})
    subsets: str | None = field(default=None, metadata={"help": "comma-separated SynthHR subsets (default all)"})
    limit: int | None = field(default=None, metadata={"help": "items per subset (SynthHR) or in all (others)"})
    n_candidates: int | None = field(default=None, metadata={"help": "SynthHR difficulty level: objects of the asked "
                                                                     "kind (1: single-candidate; default: each "
                                                                     "subset's own)"})
    methods: str = field(default="base@256,qzoom@256", metadata={"help": "comma-separated method@budget list"})
    model: str = field(default="tiny-random", metadata={"help": "QZoomModel folder | testbed | testbed-qzoom "
                                                                   "(with its trained heads) | tiny-random"})
    out: str = field(default="runs/eval", metadata={"help": "output folder (resumed if it holds records)"})
    prompt_mode: str = field(default="lmms_eval", metadata={"help": "lmms_eval | qzoom_fork"})
    batch_size: int = 1
    max_new_tokens: int | None = None
    device: str = "auto"
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (1 is fastest for tiny "
                                                                     "models on a busy machine)"})
    n_boot: int = 10_000
    title: str | None = None


class Method:
    """One evaluated configuration. __call__(model, docs, images, prompts, loader) → list of record dicts."""

    mode = "qzoom"

    def __init__(self, budget: int | None) -> None:
        self.budget = budget

    @property
    def name(self) -> str:
        return type(self).key

    def answer_kwargs(self, docs) -> dict:
        return {}

    def __call__(self, model, docs, images, prompts, max_new):
        budget = self.budget or model.config.max_visual_tokens
        lo = min(model.config.min_visual_tokens, budget)
        t0 = time.perf_counter()
        answers = model.answer(images, prompts, mode=self.mode, max_visual_tokens=budget, min_visual_tokens=lo,
                               max_new_tokens=max_new, **self.answer_kwargs(docs))
        wall = (time.perf_counter() - t0) / len(docs)
        out = []
        for a in answers:
            flops = prefill_flops(model, a, self.mode)
            out.append(dict(response=a.text, visual_tokens=a.visual_tokens, latency_s=wall,
                            stage_times={k: v / len(docs) for k, v in a.timings.items()},
                            prefill_flops=flops["total"], prefill_flops_llm=flops["llm"],
                            boxes=[list(r.box) for r in a.boxes], gate_prob=a.gate_prob,
                            zoomed=a.zoomed, fallback=a.fallback, new_tokens=a.new_tokens))
        return out


class BaseMethod(Method):
    key, mode = "base", "base"


class QZoomMethod(Method):
    key, mode = "qzoom", "qzoom"


class OracleCropMethod(Method):
    """Fuse the GT evidence box (the union of needed RoIs) instead of a predicted one."""

    key, mode = "oracle-crop", "qzoom"

    def answer_kwargs(self, docs) -> dict:
        boxes = []
        for d in docs:
            ev = d.get("evidence_union") or (d.get("item") or {}).get("evidence_union")
            boxes.append([ev] if ev else [])
        return {"boxes": boxes}


@contextmanager
def config_overridden(config, overrides: dict):
    """`config` with `overrides` set for the duration of the block; the old values are restored after."""
    saved = {k: getattr(config, k) for k in overrides}
    for k, v in overrides.items():
        setattr(config, k, v)
    try:
        yield config
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


class _ConfigOverride(Method):
    """Q-Zoom with some `QZoomConfig` fields changed for the call (ablations); the model's config is restored."""

    overrides: dict = {}

    def __call__(self, model, docs, images, prompts, max_new):
        with config_overridden(model.config, self.overrides):
            return super().__call__(model, docs, images, prompts, max_new)


class QZoomNoGateMethod(_ConfigOverride):
    """Ablation: the gate always fires (every item is zoomed)."""

    key, overrides = "qzoom-nogate", {"gate_thresh": 0.0}


class QZoomComponentsMethod(_ConfigOverride):
    """Ablation: up to 3 crops, one per connected component of the RoI map, instead of Q-Zoom's one union box."""

    key, overrides = "qzoom-k3", {"box_mode": "components", "max_boxes": 3}


class QZoomSecondImageMethod(_ConfigOverride):
    """Ablation: the crop placed as a second ordinary image (SD-RPN), not on the global image's M-RoPE grid."""

    key, overrides = "qzoom-2ndimg", {"alignment": "second_image"}


class FullMethod(Method):
    """The plain MLLM at native resolution (no budget cap)."""

    key, mode = "full", "base"

    def __call__(self, model, docs, images, prompts, max_new):
        cell = model.backbone.cell_px
        need = max((im.width * im.height) // (cell * cell) + 1 for ims in images for im in ims)
        self.budget = max(need, model.config.max_visual_tokens)
        return super().__call__(model, docs, images, prompts, max_new)


class AgentMethod(Method):
    """The LangGraph agent (eval/agent_methods.py) at a visual budget: policy ⇄ tool turns per item."""

    key = "agent-qzoom"
    agent_class = "AgentQZoomMethod"

    def __init__(self, budget: int | None) -> None:
        super().__init__(budget)
        self._agent = None

    def __call__(self, model, docs, images, prompts, max_new):
        from eval import agent_methods

        with config_overridden(model.config, {"max_visual_tokens": self.budget} if self.budget else {}):
            if self._agent is None:
                self._agent = getattr(agent_methods, self.agent_class)(model, max_new_tokens=max_new)
            out = []
            for ims, prompt in zip(images, prompts):
                row = self._agent(ims, prompt)
                row["response"] = row.pop("text")
                row["zoomed"] = row["tool_calls"] > row["invalid_calls"]
                out.append(row)
            return out


class AgentBBoxMethod(AgentMethod):
    key, agent_class = "agent-bbox", "AgentBBoxMethod"


METHODS: dict[str, type[Method]] = {m.key: m for m in (BaseMethod, QZoomMethod, OracleCropMethod, FullMethod,
                                                       QZoomNoGateMethod, QZoomComponentsMethod,
                                                       QZoomSecondImageMethod, AgentMethod, AgentBBoxMethod)}


def parse_methods(spec: str) -> list[Method]:
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, budget = part.partition("@")
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; known: {sorted(METHODS)}")
        try:
            b = int(budget) if budget else None
        except ValueError:
            raise SystemExit(f"budget in {part!r} must be an integer") from None
        out.append(METHODS[name](b))
    return out


def load_model(spec: str, device: str):
    import torch

    from qzoom_agent import QZoomModel

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if spec == "testbed":
        from qzoom_agent.testbed import load_testbed

        return load_testbed(device=dev) if "device" in load_testbed.__code__.co_varnames else load_testbed()
    if spec == "testbed-qzoom":
        from qzoom_agent.testbed import load_testbed_qzoom

        return load_testbed_qzoom(device=dev)
    if spec == "tiny-random":
        from qzoom_agent import QZoomConfig
        from qzoom_agent.testing import build_tiny_model

        hf, proc = build_tiny_model("qwen2_5_vl", qk_gain=4.0)
        cfg = QZoomConfig(family="qwen2_5_vl", twig_K=2, twig_T=2, gate_T=1, roi_conf_thresh=0.5,
                          gate_thresh=0.5, min_visual_tokens=64, max_visual_tokens=256, max_new_tokens=8)
        return QZoomModel.from_backbone(hf.to(dev), proc, cfg)
    return QZoomModel.from_pretrained(spec, device=dev)


def make_loader(args: EvalArgs):
    if args.suite.startswith("synthhr"):
        from eval.synthhr import SUBSETS, SynthHRConfig, make_items

        scale = args.suite.split("-", 1)[1] if "-" in args.suite else "mini"
        if args.data:
            return get_loader("synthhr", path=args.data, limit=args.limit)
        cfg = SynthHRConfig(scale=scale, n_candidates=args.n_candidates)
        subsets = [s.strip() for s in args.subsets.split(",")] if args.subsets else list(SUBSETS)
        sizes = {"dev": 200, "test": 500, "tp": 100}
        n = args.limit or sizes.get(args.split, 200)
        items = [it for s in subsets for it in make_items(cfg, subset=s, split=args.split, n=n)]
        return get_loader("synthhr", items=items, cfg=cfg)
    if not args.data:
        raise SystemExit(f"--data is required for suite {args.suite!r}")
    return get_loader(args.suite, path=args.data, limit=args.limit)


def _read_done(path: Path) -> tuple[list[dict], set]:
    """Records already written; a torn last line (killed mid-write) is dropped and the file repaired."""
    if not path.exists():
        return [], set()
    good, keep_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                good.append(json.loads(line))
                keep_bytes += len(line)
            except json.JSONDecodeError:
                break
    if keep_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
    return good, {(r["method"], r.get("budget"), r["doc_id"]) for r in good}


def _append(f, record: dict) -> None:
    f.write(json.dumps(record, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run(args: EvalArgs) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = parse_methods(args.methods)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    loader = make_loader(args)
    docs = list(loader.iter_docs())
    if not docs:
        raise SystemExit("the suite has no items")
    model = load_model(args.model, args.device)
    records, done = _read_done(out / "records.jsonl")
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), args=asdict(args),
                machine=dict(node=platform.node(), cpus=os.cpu_count(), python=platform.python_version()),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        import torch

        meta["machine"]["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        meta["machine"]["torch"] = torch.__version__
    except Exception:  # noqa: BLE001
        pass
    max_new = args.max_new_tokens or loader.max_new_tokens
    with open(out / "records.jsonl", "a") as f:
        for method in methods:
            todo = [d for d in docs if (method.name, method.budget, d["doc_id"]) not in done]
            bar = tqdm(total=len(todo), desc=f"{method.name}@{method.budget}", unit="item")
            for i in range(0, len(todo), args.batch_size):
                chunk = todo[i:i + args.batch_size]
                ok, images, prompts = [], [], []
                for d in chunk:
                    try:
                        images.append(loader.doc_to_images(d))
                        prompts.append(loader.doc_to_prompt(d, mode=args.prompt_mode))
                        ok.append(d)
                    except ImageDecodeError as e:
                        rec = _record(loader, d, method, loader.failed(d, "image_decode"), {})
                        rec["error"] = str(e)
                        _append(f, rec)
                        records.append(rec)
                if ok:
                    try:
                        results = method(model, ok, images, prompts, max_new)
                    except Exception as e:  # noqa: BLE001 - a failing item is counted, not fatal
                        results = [dict(response="", error=f"{type(e).__name__}: {e}") for _ in ok]
                    for d, res in zip(ok, results):
                        scored = loader.score(d, res.get("response", ""))
                        if res.get("error"):
                            scored["failure"] = "model_error"
                        rec = _record(loader, d, method, scored, res)
                        _append(f, rec)
                        records.append(rec)
                bar.update(len(chunk))
            bar.close()
    paths = write_report(records, out / "report", title=args.title or f"{args.suite} {args.split}",
                         n_boot=args.n_boot, extra={"run": meta})
    return json.loads(Path(paths["summary"]).read_text())


def _record(loader, doc, method, scored: dict, res: dict) -> dict:
    rec = dict(method=method.name, budget=method.budget, benchmark=loader.name, subset=doc.get("subset"),
               doc_id=doc["doc_id"], chance=loader.chance(doc))
    rec.update({k: v for k, v in scored.items() if k not in ("doc",)})
    rec["correct"] = bool(float(rec.get("score") or 0.0) >= 0.5)
    rec.update({k: v for k, v in res.items() if k != "response"})
    rec["response"] = res.get("response")
    if loader.name == "synthhr":
        gt = doc_ground_truth(doc, method.budget)
        rec.update(gt)
        item = doc.get("item") or {}
        rec["image_size"] = [item.get("width"), item.get("height")]
        rec["n_candidates"] = item.get("n_candidates")
    return rec


def main(argv=None) -> None:
    from qzoom_agent.cli_args import parse_args

    args = parse_args(EvalArgs, argv=argv)
    summary = run(args)
    for key, r in summary["runs"].items():
        print(f"{key:>24}: acc {r['accuracy']:.3f}  tokens {r.get('visual_tokens_mean') or 0:.0f}  "
              f"samples/s {r.get('samples_per_s') or 0:.2f}")


if __name__ == "__main__":
    main()
