"""Online response model of one server: what a power cap buys at a given load, learned live.

No offline profile is needed: each settled tick adds an observation (cap, load) -> (tokens/s,
power, SLO headroom) to an exponentially weighted cell. Cells forget: one not refreshed within
`memory_s` is ignored, because the load mix drifts and an old verdict must not block exploring
forever. An optional seed profile pre-fills cells with a low weight so live data overrides it.
The controller asks three questions of it: "is the cap below this one known to break the SLO at
this load?" (so exploration does not walk into a known cliff twice: hysteresis), "what is the
lowest cap known to be safe above this one?" (so a revert jumps there instead of creeping), and
"how many tokens per joule does this cap give at this load?" (the efficiency curve it climbs:
only cells of the same load bucket are compared, since tokens/J rises with load by itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelParams:
    bucket_w: float = 25.0  # cap resolution of the model
    load_ratio: float = 1.25  # load buckets grow geometrically by this ratio
    alpha: float = 0.2  # weight of a new observation in its cell
    memory_s: float = 180.0  # a cell older than this is forgotten
    miss_memory_s: float = 900.0  # an SLO miss is remembered longer: a miss costs a window


@dataclass(frozen=True)
class SeedPoint:
    """One point of an optional offline profile: at cap_w and load, this is what was seen."""

    cap_w: float
    requests_per_s: float
    tokens_per_s: float
    power_w: float
    headroom: float


@dataclass
class _Cell:
    tokens_per_s: float
    power_w: float
    headroom: float
    seen_s: float
    samples: int = 1


@dataclass
class ResponseModel:
    params: ModelParams = field(default_factory=ModelParams)
    cells: dict[tuple[int, int], _Cell] = field(default_factory=dict)
    # (cap key, load key) -> when an SLO miss was last seen there (no clean measurement needed)
    misses: dict[tuple[int, int], float] = field(default_factory=dict)

    def cap_key(self, cap_w: float) -> int:
        return math.floor(cap_w / self.params.bucket_w)

    def load_key(self, requests_per_s: float) -> int:
        return round(math.log1p(max(requests_per_s, 0.0)) / math.log(self.params.load_ratio))

    def seed(self, points: list[SeedPoint], now_s: float) -> None:
        for p in points:
            key = (self.cap_key(p.cap_w), self.load_key(p.requests_per_s))
            self.cells[key] = _Cell(p.tokens_per_s, p.power_w, p.headroom, now_s, samples=0)

    def observe(
        self,
        now_s: float,
        cap_w: float,
        requests_per_s: float,
        tokens_per_s: float,
        power_w: float,
        headroom: float,
    ) -> None:
        key = (self.cap_key(cap_w), self.load_key(requests_per_s))
        cell = self.cells.get(key)
        if cell is None or now_s - cell.seen_s > self.params.memory_s:
            self.cells[key] = _Cell(tokens_per_s, power_w, headroom, now_s)
            return
        a = self.params.alpha if cell.samples > 0 else 0.5
        cell.tokens_per_s += a * (tokens_per_s - cell.tokens_per_s)
        cell.power_w += a * (power_w - cell.power_w)
        # A violation is weighted in at once (pessimistic): one bad window is evidence enough.
        cell.headroom = min(headroom, cell.headroom + a * (headroom - cell.headroom))
        cell.seen_s = now_s
        cell.samples += 1

    def note_unsafe(self, now_s: float, cap_w: float, requests_per_s: float) -> None:
        """An SLO miss seen at this cap and load, outside a clean measurement window."""
        self.misses[(self.cap_key(cap_w), self.load_key(requests_per_s))] = now_s

    def _missed(self, now_s: float, requests_per_s: float) -> set[int]:
        load = self.load_key(requests_per_s)
        # Two load buckets either side: a cap that missed at a bit more or less load is
        # not worth another miss.
        return {
            cap
            for (cap, lk), seen in self.misses.items()
            if abs(lk - load) <= 2 and now_s - seen <= self.params.miss_memory_s
        }

    def _live(self, now_s: float, requests_per_s: float) -> Mapping[int, _Cell]:
        load = self.load_key(requests_per_s)
        out: dict[int, _Cell] = {}
        for (cap, lk), cell in self.cells.items():
            # Neighbouring load buckets count too: a cap unsafe at a bit less load is unsafe here.
            if abs(lk - load) <= 1 and now_s - cell.seen_s <= self.params.memory_s:
                prev = out.get(cap)
                if prev is None or cell.headroom < prev.headroom:
                    out[cap] = cell
        return out

    def unsafe_at_or_below(
        self, now_s: float, requests_per_s: float, cap_w: float, margin: float
    ) -> bool:
        """True when `cap_w` is known to be unsafe at this load: a cap at or above it recently
        missed the SLO or left less than `margin` headroom (a lower cap cannot do better)."""
        key = self.cap_key(cap_w)
        if any(c >= key for c in self._missed(now_s, requests_per_s)):
            return True
        return any(
            c >= key and cell.headroom < margin
            for c, cell in self._live(now_s, requests_per_s).items()
        )

    def known_good_cap(
        self, now_s: float, requests_per_s: float, above_w: float, margin: float
    ) -> float | None:
        """The lowest cap above `above_w` recently seen with at least `margin` headroom."""
        key = self.cap_key(above_w)
        missed = self._missed(now_s, requests_per_s)
        good = [
            c
            for c, cell in self._live(now_s, requests_per_s).items()
            if c > key and cell.headroom >= margin and not any(m >= c for m in missed)
        ]
        return (min(good) + 1) * self.params.bucket_w if good else None

    def tokens_per_joule(
        self,
        now_s: float,
        requests_per_s: float,
        cap_w: float,
        power_factor: float = 1.0,
        extra_w: float = 0.0,
    ) -> float | None:
        """Tokens/J measured at this cap and this load bucket, with power counted as
        power_factor x GPU power + extra_w (host power); None when not measured recently."""
        cell = self.cells.get((self.cap_key(cap_w), self.load_key(requests_per_s)))
        if cell is None or now_s - cell.seen_s > self.params.memory_s:
            return None
        watts = power_factor * cell.power_w + extra_w
        if watts <= 0:
            return None
        return cell.tokens_per_s / watts
