"""GT-free answer->image pointing of the shipped testbed at 256 tokens (issue #4 Tier 1), on CPU: the last prompt
token's attention per layer and head, the head chosen by peakiness + cross-layer agreement (no GT), and its hit rate
inside the GT box on the first 50 single-candidate test items of attr-cue, fsp-4k and doc-code.

    python tools/testbed_pointing.py      # -> runs/pointing/stage6_pointing.json
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qzoom_agent.checkpoint import atomic_write_text  # noqa: E402
from qzoom_agent.testbed.model import load_testbed_hf  # noqa: E402
from qzoom_agent.training.testbed_eval import load_items, pointing  # noqa: E402

OUT = Path("runs/pointing/stage6_pointing.json")
N = 50


def main() -> None:
    torch.set_num_threads(2)
    t = time.time()
    model, proc = load_testbed_hf(None, dtype=torch.float32, attn="sdpa", device="cpu")
    data = load_items(["attr-cue", "fsp-4k", "doc-code"], N, "test", workers=2)
    r = pointing(model, proc.tokenizer, data, device="cpu", batch=16)
    r["seconds"] = round(time.time() - t, 1)
    r["n_per_subset"] = N
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(r, indent=1, default=str))
    print({k: v for k, v in r.items() if k in ("chance", "chosen_head", "chosen_hit", "best_head_oracle", "seconds")})


if __name__ == "__main__":
    main()
