"""The policies `palsd simulate` compares: two fixed baselines and three feedback controllers.

Every policy is a Controller (palsd.core.types): the runner treats them alike, so a baseline
gets exactly the same observations, budget trace and write path as palsd's own controller.
"""

from __future__ import annotations

from collections.abc import Callable

from palsd.core.controller import JointController, JointParams
from palsd.core.types import Controller, Decision, Observation

PALS_BATCH = 64  # PALS's baseline batch size
VLLM_DEFAULT_BATCH = 256  # vLLM's default max_num_seqs


class DefaultPolicy:
    """What a host without power management runs: default limits, vLLM's default batch."""

    name = "default"

    def decide(self, obs: Observation) -> Decision:
        return Decision(
            power_limits_w={g.index: g.default_limit_w for g in obs.gpus},
            batch_limits={
                s.name: min(VLLM_DEFAULT_BATCH, s.max_num_seqs or 256) for s in obs.servers
            },
            reasons=("default limits, batch 256; the budget is not enforced",),
            mode="fixed",
        )


class StaticPolicy:
    """PALS's baseline: batch 64 and each GPU at min(default, budget / GPUs) (DCGM's even split)."""

    name = "static"

    def decide(self, obs: Observation) -> Decision:
        budget_w = obs.budget.effective_w
        n = max(len(obs.gpus), 1)
        limits = {
            g.index: g.default_limit_w
            if budget_w is None
            else max(g.min_limit_w, min(g.default_limit_w, budget_w / n))
            for g in obs.gpus
        }
        return Decision(
            power_limits_w=limits,
            batch_limits={
                s.name: min(PALS_BATCH, s.max_num_seqs or PALS_BATCH) for s in obs.servers
            },
            reasons=("static: budget split evenly, batch 64",),
            mode="fixed",
        )


def _joint(name: str, params: JointParams) -> Controller:
    ctrl = JointController(params)
    ctrl.name = name
    return ctrl


POLICIES: dict[str, Callable[[], Controller]] = {
    "default": DefaultPolicy,
    "static": StaticPolicy,
    "cap_only": lambda: _joint("cap_only", JointParams(control_batch=False)),
    "batch_only": lambda: _joint("batch_only", JointParams(control_caps=False)),
    "palsd": lambda: _joint("palsd", JointParams()),
}
