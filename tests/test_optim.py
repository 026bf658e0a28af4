"""The optimiser and the learning-rate schedule: the paper's warm-up, the cool-down, fused Adam."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, tiny_recipe
from transformer import train as train_module
from transformer.optim import WarmupSchedule, build_optimizer, noam_lr


def test_without_cooldown_the_schedule_is_the_papers() -> None:
    schedule = WarmupSchedule(d_model=512, warmup=4000, factor=2.0)
    for taken in (0, 1, 3999, 4000, 100_000):
        assert schedule(taken) == noam_lr(taken + 1, 512, 4000, 2.0)
    assert noam_lr(4000, 512, 4000) == pytest.approx(512**-0.5 * 4000**-0.5)
    # by hand on both sides of the peak: linear warm-up, then 1/√step
    assert noam_lr(1, 512, 4000, 2.0) == pytest.approx(2.0 * 512**-0.5 * 4000**-1.5)
    assert noam_lr(1000, 512, 4000, 2.0) == pytest.approx(2.0 * 512**-0.5 * 1000 * 4000**-1.5)
    assert noam_lr(16000, 512, 4000, 2.0) == pytest.approx(2.0 * 512**-0.5 * 16000**-0.5)


def test_cooldown_falls_linearly_from_its_start_to_zero_after_its_last_step() -> None:
    """The last step (24) learns at a fifth of the peak, not at 0, which would waste it (and leave two
    equal checkpoints for the average)."""
    schedule = WarmupSchedule(d_model=256, warmup=10, factor=1.0)
    schedule.begin_cooldown(start=20, end=24)
    peak = noam_lr(20, 256, 10)
    rates = [schedule(step - 1) for step in range(19, 27)]  # steps 19 … 26
    expected = [noam_lr(19, 256, 10), peak, 0.8 * peak, 0.6 * peak, 0.4 * peak, 0.2 * peak, 0.0, 0.0]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert not schedule.done(23) and schedule.done(24)
    with pytest.raises(ValueError):
        schedule.begin_cooldown(start=5, end=5)


def test_a_cancelled_cooldown_is_the_papers_schedule_again() -> None:
    schedule = WarmupSchedule(d_model=64, warmup=10, factor=2.0)
    schedule.begin_cooldown(start=20, end=24)
    schedule.cancel_cooldown()
    assert not schedule.cooling and not schedule.done(30)
    assert [schedule(t) for t in (22, 30)] == [noam_lr(23, 64, 10, 2.0), noam_lr(31, 64, 10, 2.0)]


def test_the_cooldown_is_saved_and_restored_with_the_scheduler() -> None:
    model = torch.nn.Linear(3, 3)
    _, scheduler = build_optimizer(model, d_model=64, warmup=5)
    scheduler.lr_lambdas[0].begin_cooldown(7, 12)
    state = scheduler.state_dict()
    _, restored = build_optimizer(torch.nn.Linear(3, 3), d_model=64, warmup=5)
    restored.load_state_dict(state)
    schedule = restored.lr_lambdas[0]
    assert (schedule.decay_start, schedule.decay_end) == (7, 12)
    assert [schedule(t) for t in range(15)] == [scheduler.lr_lambdas[0](t) for t in range(15)]


def test_fused_adam_takes_the_same_steps_as_torch_for_loop_adam() -> None:
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    plain_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    plain_model.load_state_dict(ours_model.state_dict())
    ours, _ = build_optimizer(ours_model, d_model=16, warmup=4)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    assert ours.defaults["fused"] and not plain.defaults["fused"]
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for step in range(1, 6):
        for model, optimizer in ((ours_model, ours), (plain_model, plain)):
            for group in optimizer.param_groups:
                group["lr"] = noam_lr(step, 16, 4)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_time_budgeted_run_cools_down_over_the_steps_its_pace_leaves(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that advances 10 s per update, a 60 s budget, cool-down 0.5: at 30 s (3 updates at 10 s
    each) the 30 s left hold 3 more updates, so the rate falls to 0 at update 6, and the run ends there."""
    clock = {"now": 0.0}
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    build = train_module.build_optimizer

    def ticking_optimizer(*args, **kwargs):
        optimizer, scheduler = build(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: clock.__setitem__("now", clock["now"] + 10.0))
        return optimizer, scheduler

    monkeypatch.setattr(train_module, "build_optimizer", ticking_optimizer)
    recipe = tiny_recipe(
        data_dir, max_steps=0, time_budget_minutes=1.0, cooldown=0.5, log_every=1, eval_every=0, test_split=""
    )
    train_module.train(recipe, TINY_MODEL, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in log if r["event"] == "cooldown"] == [{"event": "cooldown", "step": 3, "until": 6}]
    lr = {r["step"]: r["lr"] for r in log if r["event"] == "train"}  # the rate each step took
    peak = noam_lr(3, 32, recipe.warmup, recipe.lr_factor)
    assert [lr[s] for s in (2, 3, 4, 5, 6)] == pytest.approx(
        [noam_lr(2, 32, recipe.warmup, recipe.lr_factor), peak, 3 / 4 * peak, 2 / 4 * peak, 1 / 4 * peak]
    )
    assert max(lr) == 6  # stopped after the last step of the cool-down, within the budget


def test_without_time_or_step_budget_the_cooldown_ends_with_the_last_epoch(data_dir, tmp_path: Path) -> None:
    """No time budget and no max_steps: the run's end is max_epochs, so the rate falls towards 0 over the
    last fraction of its updates (here 2 epochs of the 200-pair slice, cool-down 0.5)."""
    recipe = tiny_recipe(
        data_dir,
        max_steps=0,
        time_budget_minutes=0,
        max_epochs=2,
        cooldown=0.5,
        log_every=1,
        eval_every=0,
        test_split="",
    )
    train_module.train(recipe, TINY_MODEL, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in log if r["event"] == "train")
    assert steps >= 8 and steps % 2 == 0  # two epochs of equally many batches
    assert [r for r in log if r["event"] == "cooldown"] == [
        {"event": "cooldown", "step": steps // 2, "until": steps}
    ]
    lr = {r["step"]: r["lr"] for r in log if r["event"] == "train"}  # the rate each step took
    assert 0.0 < lr[steps] < lr[steps - 1]  # the last step learns, at the smallest rate
