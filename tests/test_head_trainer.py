"""The head trainers' shared parts (qzoom_agent/training/head_trainer.py): schedule, budget, log, checkpoints."""
import json
import math
import random

import pytest
import torch

from qzoom_agent.training import head_trainer as ht


def test_warmup_cosine_worked_example():
    lrs = [ht.warmup_cosine(s, 10, 2) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8))) and lrs[10] == 0.0
    assert ht.warmup_cosine(0, 10, 0) == 1.0 and ht.warmup_steps_of(0.03, 100) == 3


def test_run_budget_steps_and_minutes():
    b = ht.RunBudget(minutes=0, steps=2)
    assert not b.spent(1) and b.spent(2) and b.minutes_left() == math.inf
    assert ht.RunBudget(minutes=1e-9).spent(0)
    assert not ht.RunBudget().spent(10 ** 6)


def test_jsonl_log_appends_and_echoes(tmp_path):
    seen = []
    log = ht.JsonlLog(tmp_path / "a" / "log.jsonl", echo=seen.append)
    log.write({"step": 1})
    log.write({"step": 2})
    assert [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    assert seen == ['{"step": 1}', '{"step": 2}']


def test_state_dir_round_trip_and_state_file_rng(tmp_path):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: ht.warmup_cosine(s, 10, 2))
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched.step()
    ht.save_state_dir(tmp_path / "ck", ht.head_tensors(lin), "head.safetensors", opt, sched, {"step": 1})
    assert ht.has_state_dir(tmp_path / "ck") and not ht.has_state_dir(tmp_path / "none")
    opt2 = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    tensors, state = ht.load_state_dir(tmp_path / "ck", "head.safetensors", opt2, sched2, "cpu")
    assert state == {"step": 1} and sched2.last_epoch == 1 and opt2.state_dict()["state"]
    assert torch.equal(tensors["weight"], lin.weight.detach())
    rng = random.Random(3)
    ht.save_state_file(tmp_path / "s.pt", {"x": 1, **ht.rng_state(rng)})
    want = (rng.random(), torch.rand(1))
    back = ht.restore_rng(ht.load_state_file(tmp_path / "s.pt"))
    assert back.random() == want[0] and torch.equal(torch.rand(1), want[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "s.pt"]
