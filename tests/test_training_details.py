"""Training details that the paper presets take from the authors' code: warm-up steps, the decay
schedule, and leaving out over-long pairs instead of truncating them."""
import math

import pytest
import torch

from cdpo.data.collate import drop_overlong
from cdpo.modules.optim import adamw_schedule


def _factors(total, **kw):
    module = torch.nn.Linear(2, 2)
    sched = adamw_schedule(module, lr=1.0, weight_decay=0.0, total_steps=total, **kw)["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_against_their_formulas(schedule):
    total, warmup = 20, 4
    got = _factors(total, warmup_ratio=0.0, warmup_steps=warmup, schedule=schedule)
    for step, lr in enumerate(got):
        if step < warmup:
            want = (step + 1) / (warmup + 1)
        else:
            progress = (step - warmup) / (total - warmup)
            want = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        assert lr == pytest.approx(want, abs=1e-12), step
    # warmup_steps wins over warmup_ratio; a ratio alone gives round(ratio * total) steps
    assert _factors(total, warmup_ratio=0.5, warmup_steps=warmup, schedule=schedule) == got
    assert _factors(total, warmup_ratio=0.2, schedule=schedule) == got
    with pytest.raises(ValueError, match="schedule='step': choose one of cosine, linear"):
        _factors(total, warmup_ratio=0.0, schedule="step")


def test_drop_overlong_keeps_only_pairs_under_both_limits():
    def pair(p, c, r):
        return {"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}

    pairs = [pair(10, 5, 5), pair(12, 5, 5), pair(11, 9, 1), pair(11, 1, 8), pair(11, 1, 9), pair(3, 16, 2)]
    kept = drop_overlong(pairs, prompt_length=12, length=20)
    # prompt 12 is not < 12; 11 + 9 = 20 is not < 20 (chosen or rejected); 3 + 16 = 19 fits
    assert kept == [pairs[0], pairs[3], pairs[5]]
