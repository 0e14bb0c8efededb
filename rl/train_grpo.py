"""GRPO for a thinking-with-images policy that calls the learned `zoom` (TRL GRPOTrainer, environment_factory).

    python rl/train_grpo.py --config rl/configs/cpu_smoke.yaml            # CI: tiny random model, 2 steps
    python rl/train_grpo.py --config rl/configs/testbed_1gpu.yaml         # the testbed on one GPU
    accelerate launch --config_file rl/accelerate/multi_gpu.yaml rl/train_grpo.py --config ...   # see rl/README.md

The script, top to bottom (TRL's script shape: ScriptArguments + GRPOConfig + a model config, `TrlParser`):
  1. load the policy as a QZoomModel (the testbed, a local Qwen2.5-VL/Qwen3-VL folder with Q-Zoom heads, or
     `tiny-random`), set its visual budget and make the processor encode images at exactly that budget
  2. install the fusion seam (`install_aligned_positions`) on the policy: TRL's rollouts AND its loss forward then
     place every marked zoom crop on its source's grid (design/rl_fusion.md)
  3. the dataset (SynthHR training stream, or a local parquet/jsonl), the environment (`rl/env.py`: the same zoom
     code as the LangGraph tool), the rewards (`rl/rewards.py`) and the stats callback (`rl/callbacks.py`)
  4. GRPOTrainer (LoRA through peft, or full fine-tuning); with full FT and beta > 0 TRL rebuilds the reference
     model as the stock class, so the seam is installed on `trainer.ref_model` too (and asserted)
  5. train, save the adapter/weights, and the merged policy as a QZoomModel folder (`<output_dir>/policy`) that
     `eval/run_eval.py --model` and the LangGraph agent load.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config  # noqa: E402

from qzoom_agent.aligned_positions import install_aligned_positions, is_aligned  # noqa: E402
from qzoom_agent.errors import QZoomError  # noqa: E402
from rl.callbacks import TimeLimitCallback, ZoomStatsCallback  # noqa: E402
from rl.env import EnvContext, make_env_factory, tool_name  # noqa: E402
from rl.rewards import DEFAULT_WEIGHTS, CollapseGuard, ZoomRewards  # noqa: E402

logger = logging.getLogger("rl.train_grpo")

# LoRA on the language model only (Qwen-VL's vision blocks also have *_proj MLPs, which a name list would hit)
LM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
TINY = {"tiny-random": "qwen2_5_vl", "tiny-random-qwen3": "qwen3_vl"}


@dataclass
class ScriptArguments:
    dataset: str = field(default="synthhr", metadata={"help": "'synthhr' (training stream) or a parquet/jsonl path"})
    synthhr_scale: str = field(default="mini", metadata={"help": "mini | full"})
    synthhr_subsets: str = field(default="", metadata={"help": "comma-separated subsets (empty: all 11)"})
    synthhr_start: int = field(default=0, metadata={"help": "first stream position (resume / disjoint runs)"})
    synthhr_n_candidates: int | None = field(default=None, metadata={
        "help": "SynthHR level: objects of the asked kind (1: single candidate; empty: each subset's default)"})
    num_train_items: int = field(default=4096, metadata={"help": "rows of the (lazily rendered) dataset"})
    budget_tokens: int = field(default=256, metadata={"help": "visual tokens per image (coarse view and crops)"})
    min_visual_tokens: int | None = field(default=None, metadata={"help": "lower budget (default: the model's)"})
    needs_hr_budget: int | None = field(default=None, metadata={"help": "needs_hr@B label used (default budget)"})
    prompt_mode: str = field(default="lmms_eval", metadata={"help": "lmms_eval | qzoom_fork (eval prompt modes)"})
    environment: str = field(default="zoom", metadata={"help": "zoom (ours) | deepeyes (image_zoom_in_tool, bbox_2d)"})
    fuse_crops: bool = field(default=True, metadata={"help": "crop on its source grid (marker) or ordinary image"})
    max_zoom_calls: int = field(default=3, metadata={"help": "tool calls per rollout"})
    proposer: str = field(default="frozen", metadata={"help": "frozen: LoRA off while proposing | policy"})
    size_hint: bool = field(default=False, metadata={"help": "deepeyes env: tell the policy the image size"})
    free_calls: int = field(default=2, metadata={"help": "calls on needs_hr items before zoom cost applies"})
    bonus_needs_hr_only: bool = field(default=True, metadata={"help": "tool bonus only where the item needs it"})
    answer_tag: bool = field(default=True, metadata={
        "help": "format reward asks for <answer></answer> (false: a bare answer is well formed; for a policy "
                "cold-started on bare answers, tools/make_agent_traces.py --answer_format bare)"})
    call_rate_floor: float = field(default=0.1, metadata={"help": "collapse guard floor (needs_hr call rate)"})
    scripted_policy: bool = field(default=False, metadata={"help": "force scripted tool calls (smoke runs, tests)"})
    scripted_p_zoom: float = field(default=0.6, metadata={"help": "scripted policy: first-turn zoom probability"})
    init_heads: bool = field(default=False, metadata={"help": "twig-init Q-Zoom heads when the model has none"})
    save_policy: bool = field(default=True, metadata={"help": "write <output_dir>/policy (merged QZoomModel)"})
    max_train_minutes: float = field(default=0.0, metadata={
        "help": "stop (with a checkpoint) after this much training wall time; 0: no limit"})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (CPU runs on busy boxes)"})


@dataclass
class PolicyConfig(ModelConfig):
    """TRL's ModelConfig (dtype, attention, LoRA) with our defaults and the policy-specific switches."""

    model_name_or_path: str | None = field(default="testbed", metadata={
        "help": "testbed (with its trained Q-Zoom heads) | tiny-random | tiny-random-qwen3 | a QZoomModel folder "
                "(Qwen2.5-VL/Qwen3-VL + heads)"})
    use_peft: bool = field(default=True, metadata={"help": "LoRA (peft); false: full fine-tuning"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    freeze_vision: bool = field(default=True, metadata={"help": "full FT: keep the vision tower frozen"})
    freeze_proposer_input: bool = field(default=True, metadata={
        "help": "full FT: freeze embeddings and decoder layers < twig_K, so the RoI head keeps its input features"})


# ---------------------------------------------------------------------------------------------------- 1. policy

def _dtype(name: str | None):
    return None if name in (None, "auto") else getattr(torch, name)


def load_policy(model_args: PolicyConfig, script_args: ScriptArguments, output_dir: str, write_init: bool = True):
    """The policy as a QZoomModel, with its visual budget set for this run.

    `tiny-random` is built once and written to `<output_dir>/init_policy` (by the process with `write_init`; the
    others load it), so every rank and TRL's full-FT reference model start from the same folder.
    """
    from qzoom_agent import QZoomConfig, QZoomModel

    name, dtype = model_args.model_name_or_path, _dtype(model_args.dtype)
    if name in TINY:
        from qzoom_agent.testing import build_tiny_model

        path = Path(output_dir) / "init_policy"  # a real folder: TRL rebuilds a full-FT reference from it
        if write_init:
            hf, proc = build_tiny_model(TINY[name], qk_gain=4.0)
            cfg = QZoomConfig(family=TINY[name], twig_K=2, twig_T=2, gate_T=1, roi_conf_thresh=0.5, gate_thresh=0.5,
                              min_visual_tokens=16, max_visual_tokens=64, sink_min_cells=16, system_prompt=None)
            torch.manual_seed(1)
            QZoomModel.from_backbone(hf, proc, cfg).save_pretrained(path)
        name = str(path)
    if name in ("testbed", "testbed-qzoom"):
        # the shipped testbed with its trained Q-Zoom heads (the policy of every run, ours and DeepEyes'), or the
        # bare testbed where the heads were never trained
        from qzoom_agent.testbed import QZOOM_DIR, WEIGHTS_DIR, load_testbed, load_testbed_qzoom

        if (Path(QZOOM_DIR) / "qzoom_config.json").exists():
            qzoom = load_testbed_qzoom(dtype=dtype or torch.float32)
        elif name == "testbed" and (Path(WEIGHTS_DIR) / "config.json").exists():
            qzoom = load_testbed(dtype=dtype or torch.float32)
        else:
            raise QZoomError(f"no testbed weights in {QZOOM_DIR} or {WEIGHTS_DIR} (train them with "
                             "tools/train_testbed.py and tools/train_qzoom_heads.py, or pass --model_name_or_path "
                             "tiny-random for a smoke run)")
    else:
        path = Path(name)
        if not (path / "qzoom_config.json").exists():
            raise QZoomError(f"{path} has no qzoom_config.json: give a QZoomModel folder (import official Q-Zoom "
                             "checkpoints with tools/import_qzoom_checkpoint.py)")
        qzoom = QZoomModel.from_pretrained(path, dtype=dtype, attn_implementation=model_args.attn_implementation)
    if script_args.environment == "zoom" and qzoom.roi_head is None:
        if not script_args.init_heads:
            raise QZoomError(f"{name} has no RoI head, so `zoom` cannot propose regions: train the heads first "
                             "(tools/train_qzoom_heads.py) or pass --init_heads true (twig-initialised, untrained)")
        qzoom.config.has_roi_head, qzoom.config.has_gate = True, True
        qzoom.init_heads()
    set_budget(qzoom, script_args.budget_tokens, script_args.min_visual_tokens)
    return qzoom


def set_budget(qzoom, max_tokens: int, min_tokens: int | None = None) -> None:
    """Visual budget of every image the policy sees (coarse view and crops), saved with the trained policy."""
    c = qzoom.config
    c.max_visual_tokens = int(max_tokens)
    c.min_visual_tokens = min(int(min_tokens if min_tokens is not None else c.min_visual_tokens), int(max_tokens))
    c.validate()


def match_processor_budget(processor, qzoom) -> tuple[int, int]:
    """Make the trainer's processor encode images on the grid the zoom tool uses (the model's budget).

    The marker's cells index the source image's grid as the tool encoded it; TRL re-encodes the same image with the
    processor, so both must resize identically. Returns (min_pixels, max_pixels); raises if they still disagree.
    """
    from PIL import Image

    from qzoom_agent.tool import budget

    lo, hi = budget(qzoom)
    cell = qzoom.backbone.cell_px
    size = {"shortest_edge": lo * cell * cell, "longest_edge": hi * cell * cell}
    ip = processor.image_processor
    ip.size = dict(size)
    for attr, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(ip, attr):
            setattr(ip, attr, value)
    for wh in ((768, 576), (61, 33), (2560, 1440)):
        grid = ip(images=[Image.new("RGB", wh)], return_tensors="pt")["image_grid_thw"][0].tolist()
        merged = (grid[1] * ip.patch_size // cell, grid[2] * ip.patch_size // cell)
        want = tuple(x // cell for x in qzoom.backbone.resized_hw((wh[1], wh[0]), lo, hi))
        if merged != want:
            raise QZoomError(f"processor grid {merged} != zoom tool grid {want} for a {wh} image")
    return size["shortest_edge"], size["longest_edge"]


def ensure_tool_template(processor) -> None:
    """TRL needs a chat template it can parse tool calls from; Qwen2.5-VL's own one is refused (environment.md §3).
    Unknown templates are replaced by TRL's Qwen3-VL template (same tokens: <tool_call>, <tool_response>)."""
    import copy

    from trl.chat_template_utils import add_response_schema, qwen3_vl_chat_template

    try:
        add_response_schema(copy.deepcopy(processor.tokenizer))
        return
    except ValueError:
        logger.warning("chat template not recognised by TRL: using TRL's Qwen3-VL template for tool calling")
    processor.chat_template = qwen3_vl_chat_template
    processor.tokenizer.chat_template = qwen3_vl_chat_template


def freeze_for_full_ft(qzoom, model_args: PolicyConfig) -> None:
    hf = qzoom.base
    if model_args.freeze_vision:
        hf.model.visual.requires_grad_(False)
    if model_args.freeze_proposer_input:
        hf.model.language_model.embed_tokens.requires_grad_(False)
        for layer in qzoom.backbone.layers[:qzoom.config.twig_K]:
            layer.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- 2.–4. trainer

def build_dataset(script_args: ScriptArguments):
    from rl.data import local_dataset, synthhr_dataset

    label_budget = script_args.needs_hr_budget or script_args.budget_tokens
    if script_args.dataset == "synthhr":
        subsets = [s.strip() for s in script_args.synthhr_subsets.split(",") if s.strip()] or None
        return synthhr_dataset(script_args.num_train_items, scale=script_args.synthhr_scale, subsets=subsets,
                               start=script_args.synthhr_start, budget=label_budget,
                               n_candidates=script_args.synthhr_n_candidates,
                               prompt_mode=script_args.prompt_mode)
    return local_dataset(script_args.dataset, budget=label_budget, prompt_mode=script_args.prompt_mode,
                         limit=script_args.num_train_items)


@dataclass
class Run:
    """What `build_trainer` made besides the trainer (tests and `main` use them)."""

    qzoom: object
    env_ctx: EnvContext
    rewards: ZoomRewards
    stats: ZoomStatsCallback
    env_factory: object


def build_trainer(script_args: ScriptArguments, training_args: GRPOConfig, model_args: PolicyConfig,
                  callbacks=(), train_dataset=None) -> tuple[GRPOTrainer, Run]:
    if training_args.use_vllm:
        raise QZoomError("vLLM keeps integer M-RoPE ids, so fused crops cannot be sampled with it "
                         "(design/rl_fusion.md); use HF generation (use_vllm: false)")
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    if script_args.cpu_threads:
        torch.set_num_threads(script_args.cpu_threads)
    with training_args.main_process_first(local=True, desc="load the policy"):                # 1
        qzoom = load_policy(model_args, script_args, training_args.output_dir,
                            write_init=training_args.local_process_index == 0)
    processor = qzoom.processor
    ensure_tool_template(processor)
    match_processor_budget(processor, qzoom)
    policy = qzoom.base
    install_aligned_positions(policy, processor.tokenizer)                                      # 2
    if script_args.scripted_policy:
        from rl.scripted import install_scripted_policy

        install_scripted_policy(policy, processor.tokenizer, tool_name(script_args.environment),
                                seed=training_args.seed, p_zoom=script_args.scripted_p_zoom)
    peft_config = get_peft_config(model_args)
    if peft_config is not None and not model_args.lora_target_modules:
        peft_config.target_modules = LM_LORA_TARGETS
    if peft_config is None:
        freeze_for_full_ft(qzoom, model_args)

    env_ctx = EnvContext(qzoom, fuse_crops=script_args.fuse_crops, max_calls=script_args.max_zoom_calls,
                         size_hint=script_args.size_hint)                                      # 3
    stats = ZoomStatsCallback(training_args.output_dir)
    rewards = ZoomRewards(free_calls=script_args.free_calls, bonus_needs_hr_only=script_args.bonus_needs_hr_only,
                          answer_tag=script_args.answer_tag,
                          guard=CollapseGuard(floor=script_args.call_rate_floor), sinks=[stats.record])
    if training_args.reward_weights is None:
        training_args.reward_weights = list(DEFAULT_WEIGHTS)
    if training_args.max_tool_calling_iterations is None:
        training_args.max_tool_calling_iterations = script_args.max_zoom_calls
    factory = make_env_factory(env_ctx, script_args.environment)
    trainer = GRPOTrainer(model=policy, reward_funcs=rewards.funcs(), args=training_args,             # 4
                          train_dataset=train_dataset if train_dataset is not None else build_dataset(script_args),
                          processing_class=processor, peft_config=peft_config, environment_factory=factory,
                          callbacks=[stats, *callbacks])
    if trainer.ref_model is not None:
        install_aligned_positions(trainer.ref_model, processor.tokenizer)
    for name, m in (("policy", trainer.model), ("reference", trainer.ref_model)):
        if m is not None and not is_aligned(m):
            raise QZoomError(f"the {name} model lost the aligned-positions seam")
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if script_args.proposer == "frozen" and hasattr(unwrapped, "disable_adapter"):
        env_ctx.proposer_model = unwrapped
    device = trainer.accelerator.device
    for head in (qzoom.roi_head, qzoom.gate_head):
        if head is not None:
            head.to(device=device, dtype=qzoom.backbone.dtype)
    return trainer, Run(qzoom, env_ctx, rewards, stats, factory)


# ---------------------------------------------------------------------------------------------------- 5. save

def save_policy(trainer: GRPOTrainer, run: Run, path: Path) -> Path:
    """The trained policy as a QZoomModel folder (LoRA merged), with the training budget in its config."""
    from qzoom_agent.aligned_positions import uninstall_aligned_positions

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    run.qzoom.base = model
    uninstall_aligned_positions(model)
    model.__dict__.pop("generate", None)  # the scripted policy's wrapper, if any
    run.qzoom.save_pretrained(path)
    install_aligned_positions(model, run.qzoom.processor.tokenizer)
    return path


def resume_checkpoint(training_args: GRPOConfig) -> str | None:
    """`--resume_from_checkpoint last` → the newest checkpoint in output_dir (None if there is none yet, so the
    same command starts or resumes); any other value is passed to `Trainer.train` unchanged."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value in ("last", "latest", "auto"):
        out = Path(training_args.output_dir)
        return get_last_checkpoint(str(out)) if out.is_dir() else None
    if value and not Path(value).is_dir():
        raise QZoomError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value or None


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = TrlParser((ScriptArguments, GRPOConfig, PolicyConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    t0 = time.perf_counter()
    limit = TimeLimitCallback(script_args.max_train_minutes) if script_args.max_train_minutes > 0 else None
    trainer, run = build_trainer(script_args, training_args, model_args, callbacks=[limit] if limit else [])
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the full log history (the curves' data)
    out = Path(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        if script_args.save_policy:
            save_policy(trainer, run, out / "policy")
        summary = {"seconds": round(time.perf_counter() - t0, 1), "global_step": trainer.state.global_step,
                   "stopped_by_time_limit": limit is not None and limit.stopped_at is not None,
                   "num_processes": trainer.accelerator.num_processes,
                   "metrics": result.metrics, "zoom": run.stats.summary(),
                   "script_args": asdict(script_args), "model_args": asdict(model_args)}
        (out / "run_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        logger.info("done in %.1f s: %s", summary["seconds"], json.dumps(summary["zoom"], default=str)[:400])
    return trainer, run


if __name__ == "__main__":
    main()
