"""Leak check for the testbed: answer SynthHR test items with the image blanked (grey canvas of the same
size) at coarse@256; accuracy far above chance means the answer is predictable without looking.

    python tools/testbed_leak_check.py N WEIGHTS OUT.json
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
torch.set_num_threads(1)
from qzoom_agent.testbed.model import load_testbed_hf
from qzoom_agent.training.testbed_eval import load_items, evaluate
n = int(sys.argv[1]); weights = sys.argv[2]
data = load_items(["attr-cue", "fsp-4k"], n, "test")
blank = []
for it, canvas in data:
    a = np.asarray(canvas)
    from PIL import Image
    blank.append((it, Image.fromarray(np.full_like(a, 127)) if not isinstance(canvas, np.ndarray) else np.full_like(a, 127)))
model, proc = load_testbed_hf(weights, dtype=torch.float32, attn="sdpa", device="cpu")
out = {}
for name, d in (("blank", blank), ("real", data)):
    for ff in (False, True):
        r = evaluate(model, proc.tokenizer, d, ["coarse@256"], batch=n, device="cpu", free_form=ff)
        out[f"{name}{'_free' if ff else '_mc'}"] = (r["coarse@256"], r["top_pred_share"]["coarse@256"])
        print(name, ff, out[f"{name}{'_free' if ff else '_mc'}"], flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
