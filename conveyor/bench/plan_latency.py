"""Which fleet sizes meet a latency objective: each replica's latency as a function of its load.

With n replicas each gets λ/n requests/s, and the requests in flight on one, c, satisfy Little's law at the latency
that load gives: c = (λ/n) × E2EL(c). Iterating from c = 0 rises to the smallest such c (E2EL grows with c). A
replica asked for more output tokens/s than it makes, or for more requests in flight than its batch slots, is
saturated: its queue grows without bound. More replicas lower c, so latency falls towards its value for one request
alone: an objective below that is met by no fleet size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor.autoscale.profile import Profile, interpolate

_MAX_ROWS = 12


@dataclass(frozen=True)
class LatencyCurve:
    """Mean E2EL and TPOT (s) of one replica at the given concurrencies (requests in flight); piecewise linear
    between them, flat beyond the ends. slots: its max_num_seqs, when known."""
    concurrency: tuple[float, ...]
    e2el_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    source: str
    slots: int | None = None

    def __post_init__(self) -> None:
        if not self.concurrency or not len(self.concurrency) == len(self.e2el_s) == len(self.tpot_s):
            raise ValueError("a latency curve needs matching, non-empty concurrency / E2EL / TPOT points")
        if list(self.concurrency) != sorted(set(self.concurrency)) or self.concurrency[0] <= 0:
            raise ValueError("a latency curve's concurrencies must be positive and increasing")
        if min(self.e2el_s) <= 0 or min(self.tpot_s) < 0:
            raise ValueError("a latency curve's latencies must be positive")

    def at(self, c: float) -> tuple[float, float]:
        """(E2EL s, TPOT s) at concurrency c."""
        return (interpolate(list(self.concurrency), list(self.e2el_s), c),
                interpolate(list(self.concurrency), list(self.tpot_s), c))


def curve_from_result(res: dict) -> LatencyCurve:
    """One point, a `bench serve` result's: its mean requests in flight (request throughput × mean E2EL) and mean
    E2EL and TPOT. Flat: one load says nothing of how latency falls at a lower one."""
    if "request_throughput" not in res:
        raise ValueError("the result has no request_throughput (not a `bench serve` result?)")
    e2el = res["e2el_ms"]["mean"] / 1e3
    c = max(res["request_throughput"] * e2el, 1e-9)
    return LatencyCurve((c,), (e2el,), (res["tpot_ms"]["mean"] / 1e3,),
                        f"the bench result, one load: {c:.2f} requests in flight")


def curve_from_profile(path: str, prompt_tokens: float, output_tokens: float) -> LatencyCurve:
    """A replica profile (bench/autoscale_profile.py, read by `autoscale simulate`): p50 TTFT and TPOT measured at
    several concurrencies, made into E2EL for the plan's mean prompt and output."""
    p = Profile.load(path)
    return LatencyCurve(tuple(p.concurrency), tuple(p.e2e(c, prompt_tokens, output_tokens) for c in p.concurrency),
                        tuple(p.tpot(c) for c in p.concurrency), f"the profile {path}", p.max_num_seqs)


@dataclass(frozen=True)
class Objective:
    e2el_s: float | None = None
    tpot_s: float | None = None

    def misses(self, e2el_s: float, tpot_s: float) -> list[str]:
        """What a latency misses, e.g. ['E2EL 2512 > 2000 ms']; empty when it meets the objective."""
        out = []
        for name, slo, got in (("E2EL", self.e2el_s, e2el_s), ("TPOT", self.tpot_s, tpot_s)):
            if slo is not None and got > slo * (1 + 1e-9):
                out.append(f"{name} {got * 1e3:.1f} > {slo * 1e3:g} ms")
        return out


@dataclass
class SizeCheck:
    replicas: int
    concurrency: float | None  # requests in flight per replica; None when saturated
    e2el_ms: float | None
    tpot_ms: float | None
    meets: bool
    verdict: str


def check_size(n: int, arrival_rate: float, output_demand: float, replica_throughput: float, curve: LatencyCurve,
               objective: Objective) -> SizeCheck:
    """One fleet size: each replica's load, latency and verdict."""
    if output_demand / n > replica_throughput:
        return SizeCheck(n, None, None, None, False, f"saturated: {output_demand / n:,.0f} output tokens/s asked of "
                         f"each replica, which makes {replica_throughput:,.0f}")
    c = 0.0
    for _ in range(1000):
        nxt = arrival_rate / n * curve.at(c)[0]
        settled = abs(nxt - c) <= 1e-9 * max(1.0, c)
        c = nxt
        if settled or (curve.slots and c > curve.slots):
            break
    if curve.slots and c > curve.slots:
        return SizeCheck(n, None, None, None, False,
                         f"saturated: {c:.1f} requests in flight per replica, over its {curve.slots} batch slots")
    e2el, tpot = curve.at(c)
    missed = objective.misses(e2el, tpot)
    return SizeCheck(n, c, e2el * 1e3, tpot * 1e3, not missed, "MISSES: " + ", ".join(missed) if missed else "meets")


def fleet_sizes(first: int, arrival_rate: float, output_demand: float, replica_throughput: float,
                curve: LatencyCurve, objective: Objective) -> tuple[list[SizeCheck], int | None]:
    """Sizes from `first` (the capacity plan's count) up to the smallest that meets the objective, or, when none
    does, up to where latency stops falling. Returns (rows to show, at most 12; that size or None)."""
    alone_e2el = curve.at(0.0)[0]
    # past this size each replica's load is below the curve's first point: latency is as low as it gets
    floor = max(first, math.ceil(arrival_rate * max(curve.e2el_s) / curve.concurrency[0]))
    rows, found = [], None
    for n in range(first, floor + 1):
        row = check_size(n, arrival_rate, output_demand, replica_throughput, curve, objective)
        rows.append(row)
        if row.meets:
            found = n
            break
        if row.e2el_ms is not None and row.e2el_ms <= alone_e2el * 1e3 * (1 + 1e-9):
            break  # latency at its floor: more replicas change nothing
    if len(rows) > _MAX_ROWS:
        rows = rows[:4] + rows[-(_MAX_ROWS - 4):]
    return rows, found


def format_sizes(rows: list[SizeCheck]) -> list[str]:
    """The table: one line per fleet size (a gap in the sizes is marked '...')."""
    lines = [f"{'replicas':>8}  {'in flight/replica':>17}  {'E2EL ms':>9}  {'TPOT ms':>8}  verdict"]
    prev = None
    for r in rows:
        if prev is not None and r.replicas != prev + 1:
            lines.append(f"{'...':>8}")
        prev = r.replicas
        num = (lambda x, f: "-" if x is None else format(x, f))  # noqa: E731
        lines.append(f"{r.replicas:>8}  {num(r.concurrency, '.2f'):>17}  {num(r.e2el_ms, ',.1f'):>9}  "
                     f"{num(r.tpot_ms, '.2f'):>8}  {r.verdict}")
    return lines


def none_meets(curve: LatencyCurve, objective: Objective, rows: list[SizeCheck]) -> str:
    """The plain statement when no fleet size meets the objective."""
    e2el, tpot = curve.at(0.0)
    want = " and ".join(f"{k} {v * 1e3:g} ms" for k, v in (("E2EL", objective.e2el_s), ("TPOT", objective.tpot_s))
                        if v is not None)
    best = min((r for r in rows if r.e2el_ms is not None), key=lambda r: r.e2el_ms, default=None)
    closest = f"; the closest is {best.replicas} replicas at E2EL {best.e2el_ms:,.1f} ms, TPOT {best.tpot_ms:.2f} " \
        "ms" if best else ""
    if len(curve.concurrency) == 1:
        why = (f"The plan takes every request to take as long as measured (E2EL {e2el * 1e3:,.1f} ms, TPOT "
               f"{tpot * 1e3:.2f} ms) whatever the fleet size; a --profile measured at several loads would show "
               f"whether less load per replica helps.")
    else:
        why = (f"Even at the lightest load measured ({curve.concurrency[0]:g} in flight) a request takes E2EL "
               f"{e2el * 1e3:,.1f} ms, TPOT {tpot * 1e3:.2f} ms: more replicas cannot make it faster.")
    return f"=> no fleet size meets the latency objective ({want}){closest}. {why}"
