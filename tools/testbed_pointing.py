"""GT-free answer->image pointing of the shipped testbed at 256 tokens (issue #4 Tier 1), on CPU: the last prompt
token's attention per layer and head, the head chosen by peakiness + cross-layer agreement (no GT), and its hit rate
inside the GT box on the first 50 single-candidate test items of attr-cue, fsp-4k and doc-code.

    python tools/testbed_pointing.py      # -> runs/pointing/stage6_pointing.json
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.makedirs("runs/pointing", exist_ok=True)
import json, time, torch
torch.set_num_threads(2)
from qzoom_agent.testbed.model import load_testbed_hf
from qzoom_agent.training.testbed_eval import load_items, pointing
t=time.time()
model, proc = load_testbed_hf(None, dtype=torch.float32, attn="sdpa", device="cpu")
data = load_items(["attr-cue", "fsp-4k", "doc-code"], 50, "test", workers=2)
r = pointing(model, proc.tokenizer, data, device="cpu", batch=16)
r["seconds"] = round(time.time()-t, 1); r["n_per_subset"] = 50
json.dump(r, open("runs/pointing/stage6_pointing.json", "w"), indent=1, default=str)
print({k: v for k, v in r.items() if k in ("chance", "chosen_head", "chosen_hit", "best_head_oracle", "seconds")})
