"""Workloads: a dataset's held-out texts, mixed as real traffic is.

Fresh texts come from the test split (texts the bundle never trained on). Some
requests repeat an earlier text exactly (the exact cache's case), some reword
one (the semantic cache's case), some carry a risk tag, and tenants share the
traffic by weight. The mix is explicit and seeded, so two configurations see
the very same requests.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tiergate.data import Example, load_splits

OOS = "oos"


@dataclass(frozen=True)
class TenantSpec:
    name: str
    weight: float = 1.0
    spend_per_day_usd: float | None = None  # None: no cap

    @property
    def key(self) -> str:
        return f"bench-key-{self.name}"

    @classmethod
    def parse(cls, spec: str) -> TenantSpec:
        """``name=weight`` or ``name=weight:spend_cap_usd``."""
        name, _, rest = spec.partition("=")
        weight, _, cap = (rest or "1").partition(":")
        try:
            return cls(name.strip(), float(weight), float(cap) if cap else None)
        except ValueError:
            raise ValueError(
                f"tenant {spec!r}: use name=weight or name=weight:spend_cap_usd"
            ) from None


@dataclass(frozen=True)
class Mix:
    repeats: float = 0.2  # share of requests repeating an earlier text exactly
    paraphrases: float = 0.1  # share rewording an earlier text (same label)
    out_of_scope: float | None = None  # share of fresh texts labelled oos; None: as the data
    high_risk: float = 0.0  # share sent with the hint risk_tags=[finance]
    tenants: tuple[TenantSpec, ...] = field(default_factory=lambda: (TenantSpec("default"),))

    def __post_init__(self) -> None:
        for name in ("repeats", "paraphrases", "high_risk"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a share in [0, 1]")
        if self.repeats + self.paraphrases > 0.95:
            raise ValueError("repeats + paraphrases must leave some fresh texts (<= 0.95)")
        if self.out_of_scope is not None and not 0 <= self.out_of_scope <= 1:
            raise ValueError("out_of_scope must be a share in [0, 1]")
        if not self.tenants or any(t.weight <= 0 for t in self.tenants):
            raise ValueError("at least one tenant, each with a positive weight")

    def describe(self) -> str:
        oos = "as in the data" if self.out_of_scope is None else f"{self.out_of_scope:.0%}"
        tenants = ", ".join(
            f"{t.name} x{t.weight:g}" + (f" (cap ${t.spend_per_day_usd:g}/day)" if
                                         t.spend_per_day_usd is not None else "")
            for t in self.tenants
        )  # fmt: skip
        return (
            f"{self.repeats:.0%} exact repeats, {self.paraphrases:.0%} paraphrases, "
            f"out-of-scope {oos}, {self.high_risk:.0%} high-risk; tenants: {tenants}"
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    text: str
    label: str  # ground truth
    kind: str  # fresh | repeat | paraphrase
    tenant: str
    risk_tags: tuple[str, ...] = ()
    source: str = ""  # repeats and paraphrases: the fresh text they come from


# Rewordings that keep the intent: politeness, hedges, filler. Each paraphrase
# changes at least one word, so it can never be an exact-cache hit.
_PREFIXES = ("please", "hey,", "hi,", "can you tell me", "i need to know", "quick question:",
             "could you help:", "so", "um,", "i was wondering")  # fmt: skip
_SUFFIXES = ("please", "thanks", "thank you", "asap", "if you can", "right now", "for me",
             "today")  # fmt: skip


def paraphrase(text: str, rng: random.Random) -> str:
    """A rewording of ``text`` with the same intent (never the same normalised text)."""
    words = text.rstrip("?.!").split()
    choice = rng.random()
    if choice < 0.4:
        words = [rng.choice(_PREFIXES), *words]
    elif choice < 0.8:
        words = [*words, rng.choice(_SUFFIXES)]
    else:
        words = [rng.choice(_PREFIXES), *words, rng.choice(_SUFFIXES)]
    out = " ".join(words)
    if rng.random() < 0.3:
        out += "?"
    if rng.random() < 0.3:
        out = out[:1].upper() + out[1:]
    return out


def load_pool(data: str | Path, seed: int = 0) -> tuple[list[Example], str]:
    """The held-out examples of ``data`` (its test split) and a description."""
    splits = load_splits(data, seed=seed)
    pool = splits.test or splits.val
    if not pool:
        raise ValueError(f"{data}: no held-out examples to build a workload from")
    return pool, f"{splits.source}: test split, {len(pool)} texts"


def build(pool: list[Example], mix: Mix, n: int, seed: int = 0) -> list[Item]:
    """``n`` requests following ``mix``; deterministic for a seed. Past the pool's size,
    fresh texts come round again (use a pool larger than ``n`` for clean figures)."""
    rng = random.Random(seed)
    in_scope = [e for e in pool if e.label != OOS]
    oos = [e for e in pool if e.label == OOS]
    fresh: list[Example] = list(pool)
    rng.shuffle(fresh)
    if mix.out_of_scope is not None:
        share = mix.out_of_scope
        if share > 0 and not oos:
            raise ValueError(f"an out-of-scope share of {share:g} needs texts labelled {OOS!r}; "
                             "the data has none")  # fmt: skip
        # Out-of-scope texts make up the asked share of fresh ones, each drawn once: a
        # text drawn twice would be a repeat the mix did not ask for. The fresh texts
        # are as many as both kinds can fill at that share.
        k = len(pool)
        if share > 0:
            k = min(k, int(len(oos) / share))
        if share < 1:
            k = min(k, int(len(in_scope) / (1 - share)))
        n_oos = min(len(oos), max(round(share * k), k - len(in_scope)))
        fresh = rng.sample(oos, n_oos) + rng.sample(in_scope, k - n_oos)
        rng.shuffle(fresh)
    weights = [t.weight for t in mix.tenants]
    out: list[Item] = []
    seen: dict[str, list[Item]] = {t.name: [] for t in mix.tenants}
    next_fresh = 0
    for _ in range(n):
        tenant = rng.choices(mix.tenants, weights=weights)[0].name
        tags = ("finance",) if rng.random() < mix.high_risk else ()
        r = rng.random()
        # An earlier text of the same tenant: caches are per tenant, so a repeat
        # across tenants would measure nothing but isolation.
        mine = seen[tenant][-500:]
        if mine and r < mix.repeats:
            src = rng.choice(mine)
            out.append(Item(src.text, src.label, "repeat", tenant, tags, src.text))
            continue
        if mine and r < mix.repeats + mix.paraphrases:
            src = rng.choice(mine)
            reworded = paraphrase(src.text, rng)
            out.append(Item(reworded, src.label, "paraphrase", tenant, tags, src.text))
            continue
        e = fresh[next_fresh % len(fresh)]
        next_fresh += 1
        item = Item(e.text, e.label, "fresh", tenant, tags)
        out.append(item)
        seen[tenant].append(item)
    return out


def gold(items: list[Item]) -> dict[str, tuple[str, str]]:
    """text -> (true label, the text it rewords or itself), for the frontier simulator."""
    return {i.text: (i.label, i.source or i.text) for i in items}
