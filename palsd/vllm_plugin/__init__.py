"""palsd's vLLM plugin: a live batch (admission) limit behind GET/PUT /pals/v1/batch-limit.

Two vLLM entry points (pyproject.toml): `register_engine_methods` (vllm.general_plugins,
loaded in every vLLM process) adds the EngineCore methods; `endpoint_plugin`
(vllm.endpoint_plugins, loaded in the API server when named in VLLM_PLUGINS) adds the routes.
The only code in palsd that imports vLLM, and only when vLLM calls these functions.
"""

from __future__ import annotations

from typing import Any


def register_engine_methods() -> None:
    """vLLM calls this in each of its processes; adding the methods twice is harmless."""
    from palsd.vllm_plugin.engine import install

    install()


def endpoint_plugin() -> Any:
    from palsd.vllm_plugin.endpoint import BatchLimitEndpoint

    return BatchLimitEndpoint()
