"""One markdown table from many `palsd simulate` reports (docs/controller.md's headline).

    python -m palsd.sim.summarise out/simulate/*/*/report.json

Per report: preset, scenario, seed, host tokens/J of palsd / best_fixed / default, palsd's SLO
attainment and time above budget, best_fixed's pair, and every target with met or missed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row(report: dict[str, Any]) -> str:
    pol = report["policies"]
    palsd = pol.get("palsd", {})
    best = report.get("best_fixed", {})
    fixed = pol.get("best_fixed", {})
    default = pol.get("default", {})
    pair = f"{best['cap_w']:g} W / {best['batch_limit']}" if best.get("feasible") else "none"
    vs = report.get("palsd_vs", {})
    missed = [t for t in report["targets"] if not t["met"]]
    verdict = (
        "all met"
        if not missed
        else "; ".join(f"MISSED {t['target'].split(' (')[0]}: {t['value']}" for t in missed)
    )
    curve = report.get("efficiency_curve") or {}
    return (
        f"| {report['gpu']} / {report['model'].split('/')[-1]} | {report['scenario']} | "
        f"{report['seed']} | {_f(palsd.get('tokens_per_joule_host'), '.3f')} | "
        f"{_f(fixed.get('tokens_per_joule_host'), '.3f')} ({pair}) | "
        f"{_f(default.get('tokens_per_joule_host'), '.3f')} | "
        f"{_f(vs.get('best_fixed'), '.3f')} | {_f(vs.get('default'), '.3f')} | "
        f"{_f(palsd.get('slo_attainment'), '.3f')} | "
        f"{_f(palsd.get('seconds_above_budget'), '.1f')} | "
        f"{curve.get('regime', '-')} ({_f(curve.get('optimum_cap_w'), 'g')} W) | "
        f"{report['wall_s_all_policies']:.0f} / {report.get('cpu_s_all_policies', 0):.0f} | "
        f"{verdict} |"
    )


HEADER = (
    "| preset | scenario | seed | palsd tokens/J (host) | best_fixed (pair) | default | "
    "palsd / best_fixed | palsd / default | palsd SLO attainment | palsd s above budget | "
    "curve optimum | wall / CPU s | targets |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    print(HEADER)
    for path in paths:
        print(row(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
