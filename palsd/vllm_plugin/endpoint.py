"""API-server half of the plugin: GET/PUT /pals/v1/batch-limit on vLLM's FastAPI app,
forwarded to the engine-core methods of engine.py through utility calls. Imported only
inside vLLM's API-server process (it imports FastAPI).

At start it decides who may call (contract.decide_access: secure by default), asks the
engines once, and says both in one line of vLLM's log."""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from palsd.vllm_plugin.contract import (
    ENDPOINT_PLUGIN,
    GENERAL_PLUGIN,
    GET_METHOD,
    MIN_VLLM,
    PATH,
    SET_METHOD,
    Access,
    ContractError,
    check_access,
    combine,
    decide_access,
    parse_limit,
)

# Under "vllm." so the lines land in vLLM's own log, with its format and level.
log = logging.getLogger("vllm.palsd_batch_limit")
# The start-up question to the engines; a slow start must not hold vLLM up for longer.
PROBE_TIMEOUT_S = 60.0


class _Engines:
    """Utility calls to every engine core (one per data-parallel rank)."""

    def __init__(self, engine_client: Any) -> None:
        self._core = getattr(engine_client, "engine_core", None)

    async def call(self, method: str, *args: Any) -> dict[str, int]:
        core = self._core
        if core is None:
            raise ContractError(503, "no engine behind this API server")
        try:
            if hasattr(core, "call_utility_all_async"):
                states = await core.call_utility_all_async(method, *args)
            elif hasattr(core, "call_utility_async"):
                states = [await core.call_utility_async(method, *args)]
            else:
                raise ContractError(
                    501,
                    "this vLLM's engine client has no utility calls; "
                    f"palsd's batch limit needs vLLM >= {MIN_VLLM}",
                )
        except ContractError:
            raise
        except Exception as e:
            raise ContractError(501, _explain(method, e)) from e
        errors = [str(s["error"]) for s in states if isinstance(s, dict) and "error" in s]
        if errors:
            raise ContractError(501, errors[0])
        return combine(states)


def _explain(method: str, e: Exception) -> str:
    text = str(e)
    if "has no attribute" in text and method in text:
        return (
            f"the engine-side plugin is not loaded: name both {GENERAL_PLUGIN} and "
            f"{ENDPOINT_PLUGIN} in VLLM_PLUGINS ({text})"
        )
    return f"engine call {method} failed: {text}"


def _error(e: ContractError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)


class BatchLimitEndpoint:
    """The object vLLM's `vllm.endpoint_plugins` loader expects (see EndpointPlugin)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self._engines: _Engines | None = None
        self._access = Access(refused="the endpoint is not initialised yet", refused_status=503)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(PATH, self.get, methods=["GET"])
        router.add_api_route(PATH, self.put, methods=["PUT"])
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._engines = _Engines(engine_client) if engine_client is not None else None
        self._access = decide_access(api_keys=getattr(args, "api_key", None))
        engines, engines_ok = await self._probe()
        line = f"palsd batch-limit endpoint at {PATH}: {self._access.describe()}; {engines}"
        if self._access.refused is not None:
            log.error(line)
        elif self._access.open or not engines_ok:
            log.warning(line)
        else:
            log.info(line)

    async def _probe(self) -> tuple[str, bool]:
        """One question to the engines at start, so a missing engine half or a vLLM without
        the scheduler hook is said when vLLM starts, not at palsd's first call."""
        if self._engines is None:
            return "no engine behind this API server", False
        try:
            state = await asyncio.wait_for(self._engines.call(GET_METHOD), PROBE_TIMEOUT_S)
        except ContractError as e:
            return f"engines unusable, calls will answer {e.status}: {e.reason}", False
        except TimeoutError:
            return f"engines did not answer within {PROBE_TIMEOUT_S:g} s", False
        except Exception as e:  # never take vLLM's start down with the plugin
            return f"engines unusable: {type(e).__name__}: {e}", False
        return f"limit {state['limit']} of max_num_seqs {state['max_num_seqs']}", True

    def _guard(self, request: Request) -> _Engines:
        check_access(self._access, request.headers.get("authorization"))
        if self._engines is None:
            raise ContractError(503, "no engine behind this API server")
        return self._engines

    async def get(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._guard(request).call(GET_METHOD))
        except ContractError as e:
            return _error(e)

    async def put(self, request: Request) -> JSONResponse:
        try:
            engines = self._guard(request)
            try:
                body = json.loads(await request.body() or b"null")
            except ValueError as e:
                raise ContractError(400, f"body is not JSON: {e}") from e
            before = await engines.call(GET_METHOD)
            limit = parse_limit(body, before["max_num_seqs"])
            return JSONResponse(await engines.call(SET_METHOD, limit))
        except ContractError as e:
            return _error(e)
