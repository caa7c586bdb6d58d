"""Writes what `palsd simulate` measured: report.json, report.md (beside PALS), PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from palsd.sim.simulate import RunResult

PALS_TOKENS_PER_J_X = 1.26  # PALS, one node, vs fixed 400 W / batch 64
PALS_FEWER_VIOLATIONS_X = (4.0, 7.0)  # PALS, 3 nodes under a 4.8 kW budget
TARGET_TOKENS_PER_J_X = 1.35
TARGET_ATTAINMENT = 0.99
TARGET_FEWER_VIOLATIONS_X = 10.0


def targets(scenario: str, pol: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows for this scenario."""
    rows: list[tuple[str, str, bool]] = []
    palsd, static = pol.get("palsd"), pol.get("static")
    if palsd is None:
        return rows
    rows.append(
        (
            "palsd seconds_above_budget == 0",
            f"{palsd['seconds_above_budget']:.1f} s",
            palsd["seconds_above_budget"] == 0,
        )
    )
    if static is None:
        return rows
    if scenario == "efficiency":
        ratio = palsd["tokens_per_joule"] / static["tokens_per_joule"]
        rows.append(
            (
                f"palsd >= {TARGET_TOKENS_PER_J_X}x static tokens/J (PALS: {PALS_TOKENS_PER_J_X}x)",
                f"{ratio:.2f}x",
                ratio >= TARGET_TOKENS_PER_J_X,
            )
        )
        rows.append(
            (
                f"palsd slo_attainment >= {TARGET_ATTAINMENT}",
                f"{palsd['slo_attainment']:.3f}",
                palsd["slo_attainment"] >= TARGET_ATTAINMENT,
            )
        )
    if scenario == "strict":
        s, p = static["slo_violation_windows"], palsd["slo_violation_windows"]
        ratio = math.inf if p == 0 and s > 0 else (s / p if p else 1.0)
        lo, hi = PALS_FEWER_VIOLATIONS_X
        rows.append(
            (
                f"palsd >= {TARGET_FEWER_VIOLATIONS_X:.0f}x fewer violating windows than static "
                f"(PALS: {lo:.0f}-{hi:.0f}x)",
                f"{s} -> {p} ({ratio:.1f}x)",
                ratio >= TARGET_FEWER_VIOLATIONS_X,
            )
        )
    return rows


def markdown(meta: dict[str, Any], pol: dict[str, dict[str, Any]]) -> str:
    static_tpj = pol.get("static", {}).get("tokens_per_joule") or 0.0
    lines = [
        f"# palsd simulate: {meta['scenario']}",
        "",
        f"{meta['description']}. Model {meta['model']} ({meta['host']}), "
        f"{meta['hours']} h virtual, seed {meta['seed']}. SLO: {meta['slo']}.",
        "",
        "| policy | tokens/J | vs static | SLO attainment | violating windows | "
        "s above budget (1 s avg power / limits) | s instant above | tokens | energy MJ | "
        "$/Mtok | speed x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in pol.items():
        vs = p["tokens_per_joule"] / static_tpj if static_tpj else float("nan")
        cost = p.get("cost_usd_per_million_tokens")
        lines.append(
            f"| {name} | {p['tokens_per_joule']:.3f} | {vs:.2f}x | {p['slo_attainment']:.3f} | "
            f"{p['slo_violation_windows']}/{p['slo_windows']} | "
            f"{p['seconds_above_budget']:.1f} ({p['seconds_power_above_budget']:.1f} / "
            f"{p['seconds_limits_above_budget']:.1f}) | "
            f"{p['seconds_instant_above_budget']:.1f} | {p['tokens']:.3g} | "
            f"{p['energy_j'] / 1e6:.2f} | {'-' if cost is None else f'{cost:.4f}'} | "
            f"{p['speed_x_real_time']:.0f} |"
        )
    lines += [
        "",
        f"PALS (arXiv 2605.21427) published: {PALS_TOKENS_PER_J_X}x tokens/J over a fixed cap "
        f"with batch 64; {PALS_FEWER_VIOLATIONS_X[0]:.0f}-{PALS_FEWER_VIOLATIONS_X[1]:.0f}x fewer "
        "QoS violations under a strict budget (their QoS is a throughput target; ours is TTFT and "
        "ITL quantiles per 10 s window, a stricter test).",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in targets(meta["scenario"], pol):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def plot(out: Path, meta: dict[str, Any], runs: list[RunResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(11, 4.5))
    first = runs[0].timeline
    ax.step(
        [t / 60 for t in first["t_s"]], first["budget_w"], "k-", lw=2, label="budget", where="post"
    )
    for r in runs:
        ax.plot([t / 60 for t in r.timeline["t_s"]], r.timeline["power_w"], lw=0.9, label=r.policy)
    ax.set_xlabel("virtual time (min)")
    ax.set_ylabel("host GPU power (W)")
    ax.set_title(f"{meta['scenario']}: GPU power drawn against the budget")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "power.png", dpi=110)
    plt.close(fig)
    written.append("power.png")

    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for key, ax, label in (
        ("itl_ratio", axes[0], "worst server ITL p90 / SLO"),
        ("ttft_ratio", axes[1], "worst server TTFT p90 / SLO"),
    ):
        for r in runs:
            ax.plot([t / 60 for t in r.timeline["t_s"]], r.timeline[key], lw=0.8, label=r.policy)
        ax.axhline(1.0, color="k", lw=1.5, ls="--", label="SLO")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=2.0)
    axes[1].set_xlabel("virtual time (min)")
    axes[0].legend(loc="upper left", fontsize=8, ncol=3)
    axes[0].set_title(f"{meta['scenario']}: latency against the SLO (5 s windows)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")
    return written


def write(out: Path, meta: dict[str, Any], runs: list[RunResult]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    pol = {r.policy: r.summary() for r in runs}
    report = {
        **meta,
        "policies": pol,
        "targets": [
            {"target": t, "measured": m, "met": ok} for t, m, ok in targets(meta["scenario"], pol)
        ],
    }
    report["plots"] = plot(out, meta, runs)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(meta, pol))
    return report
