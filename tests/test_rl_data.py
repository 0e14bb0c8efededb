"""rl/data.py: SynthHR stream rows and local parquet/jsonl rows, in the form GRPO, the environment and rewards read."""
from __future__ import annotations

import json
import pickle

from PIL import Image

from rl.data import local_dataset, synthhr_dataset, system_prompt
from rl.rewards import score_answer


def test_synthhr_rows_are_lazy_deterministic_and_labelled():
    from eval.synthhr import SynthHRConfig
    from eval.synthhr.stream import train_item

    ds = synthhr_dataset(3, budget=256, subsets=["attr-cue", "coarse"])
    assert ds.column_names == ["k"] and len(ds) == 3  # nothing rendered until a row is read
    row = ds[0]
    item = json.loads(row["item"])
    assert item == json.loads(json.dumps(train_item(SynthHRConfig(scale="mini"), ("attr-cue", "coarse"), 0),
                                         sort_keys=True))
    assert row["needs_hr"] == item["needs_hr@256"] and row["subset"] == "attr-cue"
    system, user = row["prompt"]
    assert system == {"role": "system", "content": system_prompt()}
    assert user["content"][0] == {"type": "image"} and user["content"][1]["text"] == row["question"]
    assert "(A)" in row["question"] or "A." in row["question"]  # the eval's MC prompt
    assert row["images"][0].size == (item["width"], item["height"])  # the original image: the tool crops it
    assert ds[1]["subset"] == "coarse" and ds[1]["needs_hr"] is False
    assert ds[0]["images"][0].tobytes() == row["images"][0].tobytes()
    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers
    assert again[2]["item"] == ds[2]["item"]


def test_local_jsonl_and_parquet(tmp_path):
    from datasets import Dataset

    img = Image.new("RGB", (320, 240), "red")
    img.save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What color is it?", "options": ["red", "blue"], "answer": "A",
             "needs_hr": True},
            {"image": "a.png", "question": "Read the code.", "answer": "K7Q-42X", "subset": "codes"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = local_dataset(str(tmp_path / "train.jsonl"), budget=256)
    mc, open_ = ds[0], ds[1]
    assert mc["images"][0].size == (320, 240) and mc["needs_hr"] is True and mc["subset"] == "custom"
    assert score_answer(mc["item"], "<answer>A</answer>") == 1.0 and score_answer(mc["item"], "B") == 0.0
    assert open_["needs_hr"] is None and open_["subset"] == "codes"
    assert score_answer(open_["item"], "<answer>K7Q-42X</answer>") == 1.0
    assert open_["question"].startswith("Read the code.")

    pq = tmp_path / "pq"
    pq.mkdir()
    Dataset.from_dict({"images": [[img]], "question": ["What color?"], "answer": ["red"]}).to_parquet(
        str(pq / "train.parquet"))
    row = local_dataset(str(pq))[0]
    assert row["images"][0].size == (320, 240) and score_answer(row["item"], "red") == 1.0


def test_n_candidates_sets_the_generator_level_of_rows_and_eval_items():
    """`synthhr_n_candidates: 1` (the testbed configs) must reach the generator, or RL trains on items with several
    objects of the asked kind, which the testbed cannot bind (issue #4)."""
    from rl.data import synthhr_eval_dataset

    default = synthhr_dataset(6, budget=576, subsets=["attr-cue"])
    single = synthhr_dataset(6, budget=576, subsets=["attr-cue"], n_candidates=1)
    levels = [json.loads(single[k]["item"])["n_candidates"] for k in range(6)]
    assert levels == [1] * 6
    assert any(json.loads(default[k]["item"])["n_candidates"] > 1 for k in range(6))
    ev = synthhr_eval_dataset("test", subsets=["attr-cue"], limit=3, budget=576, n_candidates=1)
    assert [json.loads(ev[k]["item"])["n_candidates"] for k in range(3)] == [1, 1, 1]
    assert all(ev[k]["needs_hr"] == json.loads(ev[k]["item"])["needs_hr@576"] for k in range(3))
