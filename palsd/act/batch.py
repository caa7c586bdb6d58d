"""The batch-limit actuator: HTTP client of the admin endpoint palsd's vLLM plugin adds
(and the simulated host serves), GET/PUT /pals/v1/batch-limit.

Contract: GET answers {"max_num_seqs", "limit", "running", "waiting"}; PUT {"limit": N} with
1 <= N <= max_num_seqs answers the same object, anything else a 4xx with {"error": reason}.
An optional bearer token guards both. Every call is bounded in time (timeout x attempts plus
backoff), so a dead server cannot stall the control loop.

Each client keeps one connection to its server alive (palsd.sense.http_get, the scrapes' lean
client): the batch task reads every few seconds, and through httpx each read cost about 3 ms of
CPU, a fifth of what the daemon spent.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from palsd.core.types import BatchControl
from palsd.errors import PalsdError
from palsd.sense.http_get import HttpGetError, HttpGetTimeout, Page, PageGetter

BATCH_LIMIT_PATH = "/pals/v1/batch-limit"


class BatchLimitError(PalsdError):
    """A batch-limit call failed; `reason` is a short label for metrics and logs, `control`
    what it says about palsd's control of the server's batch limit."""

    reason = "error"
    control = BatchControl.UNREACHABLE

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        self.detail = message
        super().__init__(f"batch limit at {url}: {message}")


class BatchLimitRejected(BatchLimitError):
    """The server refused the value (4xx); retrying the same value will not help."""

    reason = "rejected"


class BatchLimitUnauthorized(BatchLimitError):
    """401/403: the bearer token is missing or does not match the plugin's."""

    reason = "unauthorized"
    control = BatchControl.UNAUTHORISED


class BatchLimitUnavailable(BatchLimitError):
    """Unreachable, timed out, a 5xx or a malformed answer."""

    reason = "unavailable"


class BatchLimitPluginMissing(BatchLimitUnavailable):
    """404/405: no batch-limit endpoint (palsd's plugin is not loaded in vLLM)."""

    control = BatchControl.PLUGIN_MISSING


class BatchLimitEnginePluginMissing(BatchLimitUnavailable):
    """501: the endpoint exists but the engine half of the plugin is not loaded (or vLLM lacks
    the scheduler hook)."""

    control = BatchControl.ENGINE_PLUGIN_MISSING


@dataclass(frozen=True)
class BatchLimitState:
    max_num_seqs: int
    limit: int
    running: int
    waiting: int


def _int_field(body: dict[str, Any], name: str) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v):
        raise ValueError(f"field {name!r} is {v!r}, not an integer")
    return int(v)


def parse_state(body: Any) -> BatchLimitState:
    """The endpoint's JSON object -> BatchLimitState; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    return BatchLimitState(
        max_num_seqs=_int_field(body, "max_num_seqs"),
        limit=_int_field(body, "limit"),
        running=_int_field(body, "running"),
        waiting=_int_field(body, "waiting"),
    )


def _error_text(resp: Page) -> str:
    try:
        body = json.loads(resp.body)
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    return resp.text[:200] or resp.reason


class BatchLimitClient:
    """One server's batch-limit endpoint. `url` is the server's base URL. Calls go one at a
    time over one kept-alive connection; `close()` closes it (a later call opens another)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 1.0,
        attempts: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        self.url = url.rstrip("/") + BATCH_LIMIT_PATH
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = PageGetter(self.url, headers=headers, accept="application/json")
        self._one_at_a_time = asyncio.Lock()  # the batch task and the restore at exit
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s

    def close(self) -> None:
        self._http.close()

    async def get(self) -> BatchLimitState:
        """The server's current state. One attempt: the caller polls again, so retrying here
        would only delay it. Raises a BatchLimitError subclass naming the problem."""
        return await self._call("GET", None, attempts=1)

    async def set(self, limit: int) -> BatchLimitState:
        """Set the live admission limit; answers the state after the change.

        Retries transport errors and 5xx with exponential backoff, `attempts` times in all;
        a 4xx is final. Raises a BatchLimitError subclass naming the problem.
        """
        return await self._call("PUT", {"limit": limit}, attempts=self._attempts)

    async def _call(
        self, method: str, body: dict[str, int] | None, attempts: int
    ) -> BatchLimitState:
        last: BatchLimitError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                resp = await self._request(method, body)
            except HttpGetTimeout:
                last = BatchLimitUnavailable(self.url, f"timed out after {self._timeout_s:g} s")
                continue
            except HttpGetError as e:
                last = BatchLimitUnavailable(self.url, f"unreachable ({e})")
                continue
            if resp.status >= 500 and resp.status != 501:
                # 501 is final: the plugin half in the engine is missing or vLLM is too old.
                last = BatchLimitUnavailable(self.url, f"HTTP {resp.status}: {_error_text(resp)}")
                continue
            return self._answer(resp)
        assert last is not None
        raise last

    async def _request(self, method: str, body: dict[str, int] | None) -> Page:
        """One request. vLLM closes a connection idle for 5 s; when it drops a kept-alive one
        unanswered, a GET is sent once more at once (on a fresh connection, by PageGetter), so
        a server that is up is never reported unreachable for it. A PUT is left to the
        attempts above."""
        async with self._one_at_a_time:
            if body is None:
                return await self._http.request(method, self._timeout_s)
            data = json.dumps(body, separators=(",", ":")).encode()
            return await self._http.request(method, self._timeout_s, data)

    def _answer(self, resp: Page) -> BatchLimitState:
        code = resp.status
        if code in (401, 403):
            raise BatchLimitUnauthorized(
                self.url, f"HTTP {code}: {_error_text(resp)} (check the token on both sides)"
            )
        if code == 501:
            raise BatchLimitEnginePluginMissing(self.url, f"HTTP 501: {_error_text(resp)}")
        if code in (404, 405):
            raise BatchLimitPluginMissing(
                self.url,
                f"HTTP {code}: no batch-limit endpoint (is palsd installed in vLLM's "
                "environment and named in VLLM_PLUGINS?)",
            )
        if code >= 400:
            raise BatchLimitRejected(self.url, f"HTTP {code}: {_error_text(resp)}")
        try:
            return parse_state(json.loads(resp.body))
        except ValueError as e:
            raise BatchLimitUnavailable(self.url, f"malformed answer: {e}") from e
