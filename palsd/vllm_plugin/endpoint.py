"""API-server half of the plugin: GET/PUT /pals/v1/batch-limit on vLLM's FastAPI app,
forwarded to the engine-core methods of engine.py through utility calls. Imported only
inside vLLM's API-server process (it imports FastAPI)."""

from __future__ import annotations

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
    PATH,
    SET_METHOD,
    ContractError,
    check_token,
    combine,
    load_token,
    parse_limit,
)

log = logging.getLogger("palsd.vllm_plugin")


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
                    "palsd's batch limit needs vLLM >= 0.32",
                )
        except ContractError:
            raise
        except Exception as e:
            raise ContractError(501, _explain(method, e)) from e
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
        self._token: str | None = None
        self._token_error: str | None = None

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(PATH, self.get, methods=["GET"])
        router.add_api_route(PATH, self.put, methods=["PUT"])
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._engines = _Engines(engine_client) if engine_client is not None else None
        try:
            self._token = load_token()
        except (OSError, ValueError) as e:
            # Fail closed: a token that was meant to be there but cannot be read locks the door.
            self._token_error = f"cannot read the plugin token: {e}"
            log.error("palsd batch-limit endpoint: %s; every call will be refused", e)
        log.info(
            "palsd batch-limit endpoint at %s (token %s)",
            PATH,
            "required" if self._token or self._token_error else "not required",
        )

    def _guard(self, request: Request) -> _Engines:
        if self._token_error is not None:
            raise ContractError(503, self._token_error)
        check_token(self._token, request.headers.get("authorization"))
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
