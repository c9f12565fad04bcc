"""The front end's autoscaling policy: its decisions on its own load signals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

# Ray Serve warns on import under pydantic 2; importorskip absorbs it as the other
# cluster tests do.
pytest.importorskip("ray.serve", reason="needs ray[serve] (make test installs it)")

from tiergate.ray_app import IDLE_DECISIONS, frontend_autoscaling_policy


def ctx(lag: list[float], inflight: list[float], current: int = 2, state: Any = None,
        low: int = 1, high: int = 4) -> Any:  # fmt: skip
    ids = [f"r{i}" for i in range(len(lag))]
    return SimpleNamespace(
        aggregated_metrics={
            "loop_lag_ms": dict(zip(ids, lag, strict=True)),
            "inflight": dict(zip(ids, inflight, strict=True)),
        },
        current_num_replicas=current,
        policy_state=state or {},
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
    )


def test_scales_up_on_lag_or_requests_in_flight_within_bounds() -> None:
    assert frontend_autoscaling_policy(ctx([30.0, 20.0], [5, 5]))[0] == 3
    assert frontend_autoscaling_policy(ctx([0.1, 0.2], [400, 300]))[0] == 3
    assert frontend_autoscaling_policy(ctx([30.0], [5], current=4))[0] == 4  # at the max


def test_scales_down_only_after_sustained_idleness() -> None:
    state: dict[str, Any] = {}
    targets = []
    for _ in range(IDLE_DECISIONS):
        target, state = frontend_autoscaling_policy(ctx([0.2, 0.1], [0, 1], state=state))
        targets.append(target)
    assert targets == [2] * (IDLE_DECISIONS - 1) + [1]
    # A busy moment in between starts the count again.
    _, state = frontend_autoscaling_policy(ctx([0.2], [0], state={"idle": IDLE_DECISIONS - 1}))
    _, state = frontend_autoscaling_policy(ctx([5.0], [50], state=state))
    assert state["idle"] == 0
    assert frontend_autoscaling_policy(ctx([0.1], [0], current=1, state={"idle": 99}))[0] == 1


def test_without_reports_it_stays() -> None:
    empty = ctx([], [], current=3)
    empty.aggregated_metrics = None
    assert frontend_autoscaling_policy(empty)[0] == 3
