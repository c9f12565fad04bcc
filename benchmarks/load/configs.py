"""The configurations compared side by side: each is a tiergate policy on one bundle.

They follow the published hybrid-routing comparisons:

- ``frontier``: every request goes to the frontier LLM (no local tier, no cache).
- ``routing``: the linear tier's confidence routes each request up front to one
  model, the intent model or the frontier; no second chance, no cache.
- ``cascade``: rules, linear, intent model in turn, each answering when its gate
  says so, the rest escalated; no cache.
- ``hybrid``: the cascade with the exact and semantic caches: tiergate as shipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from benchmarks.load.workload import Mix
from tiergate.frontier import SimulatorParams

CONFIGS = ("frontier", "routing", "cascade", "hybrid")
NO_CACHE = {"exact_ttl_s": 0, "semantic_ttl_s": 0}


def policy(
    config: str,
    bundle: Path,
    frontier_url: str,
    prices: SimulatorParams,
    mix: Mix,
    model: str = "simulated",
    api_key_env: str | None = None,
) -> dict[str, Any]:
    """The policy document of ``config``."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; use {CONFIGS}")
    task: dict[str, Any] = {"bundle": str(bundle.resolve())}
    cache: dict[str, Any] = dict(NO_CACHE)
    if config == "frontier":
        task["tiers"] = []
    elif config == "routing":
        task.update(mode="route", tiers=["intent"])
    elif config == "hybrid":
        cache = {}
    tenants: dict[str, Any] = {}
    for t in mix.tenants:
        entry: dict[str, Any] = {"key_sha256": [hashlib.sha256(t.key.encode()).hexdigest()]}
        if t.spend_per_day_usd is not None:
            entry["quota"] = {"spend_per_day_usd": t.spend_per_day_usd}
        tenants[t.name] = entry
    provider: dict[str, Any] = {
        "name": "frontier", "base_url": frontier_url, "model": model,
        "price_in_per_mtok": prices.price_in_per_mtok,
        "price_out_per_mtok": prices.price_out_per_mtok, "timeout_s": 60,
    }  # fmt: skip
    if api_key_env:
        provider["api_key_env"] = api_key_env
    return {
        "version": f"bench-{config}",
        "tasks": {"bench": task},
        "auth": {"required": True},
        "tenants": tenants,
        "cache": cache,
        "frontier": {"providers": [provider]},
    }


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
