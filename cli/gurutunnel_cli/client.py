"""The technician REST client: one ``httpx.AsyncClient`` with a bounded timeout on every call.

Contract: every method returns the API's decoded JSON or raises a ``CliError``:
``AuthError`` for 401, ``ApiError`` (with the API's ``code`` and ``message``) for any other
non-2xx answer, ``NetworkError`` (naming the URL) when the API cannot be reached or a transfer
breaks. The transport is injectable (``httpx.MockTransport`` in unit tests).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from .errors import ApiError, AuthError, NetworkError

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
STREAM_READ_MARGIN_S = 30.0
"""An exec stream may be silent for the command's whole timeout; the read waits this much more."""

JsonObject = dict[str, Any]


def error_from_response(response: httpx.Response, body: bytes | None = None) -> ApiError:
    """The ``ApiError`` (or ``AuthError``) an error answer stands for."""
    raw = response.content if body is None else body
    code = f"http_{response.status_code}"
    message = raw.decode("utf-8", "replace").strip()[:300] or response.reason_phrase
    try:
        err = json.loads(raw)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    if response.status_code == 401:
        return AuthError(f"the API refused the token ({message})")
    return ApiError(response.status_code, code, message)


class ApiClient:
    """Calls ``<api_url>/api/v1`` with ``Authorization: Bearer <token>``."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.base_url = f"{self.api_url}{API_PREFIX}"
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            transport=transport,
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Any:
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.request(method, path, json=json_body, params=params)
        except httpx.TimeoutException as exc:
            raise NetworkError(url, f"no answer within {self.timeout_s:g}s") from exc
        except httpx.TransportError as exc:
            raise NetworkError(url, str(exc) or type(exc).__name__) from exc
        if response.is_error:
            raise error_from_response(response)
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "bad_response", f"{url}: not JSON") from exc

    # ------------------------------------------------------------------ REST routes
    async def login(self, username: str, password: str) -> JsonObject:
        body: JsonObject = await self.request(
            "POST", "/auth/token", json_body={"username": username, "password": password}
        )
        return body

    async def agents(self) -> JsonObject:
        body: JsonObject = await self.request("GET", "/agents")
        return body

    async def sessions(self, *, agent_id: str | None, state: str | None) -> JsonObject:
        params = {k: v for k, v in {"agent_id": agent_id, "state": state}.items() if v}
        body: JsonObject = await self.request("GET", "/tunnel/sessions", params=params)
        return body

    async def open_session(self, agent_id: str) -> JsonObject:
        body: JsonObject = await self.request(
            "POST", "/tunnel/open", json_body={"agent_id": agent_id}
        )
        return body

    async def close_session(self, session_id: str) -> JsonObject:
        body: JsonObject = await self.request(
            "POST", "/tunnel/close", json_body={"session_id": session_id}
        )
        return body

    async def session_status(self, session_id: str) -> JsonObject:
        body: JsonObject = await self.request("GET", f"/tunnel/status/{session_id}")
        return body

    async def cancel_exec(self, session_id: str, channel_id: str) -> JsonObject:
        body: JsonObject = await self.request(
            "POST", f"/tunnel/{session_id}/exec/{channel_id}/cancel"
        )
        return body

    async def ws_ticket(self, session_id: str) -> JsonObject:
        body: JsonObject = await self.request("POST", f"/tunnel/{session_id}/ws-ticket")
        return body

    def ws_url(self, session_id: str, ticket: str) -> str:
        """``ws(s)://.../tunnel/<id>/ws?ticket=...`` for this API."""
        base = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return str(httpx.URL(f"{base}/tunnel/{session_id}/ws", params={"ticket": ticket}))

    @asynccontextmanager
    async def exec_stream(
        self, session_id: str, body: Mapping[str, Any], *, command_timeout_s: float
    ) -> AsyncIterator[AsyncIterator[str]]:
        """POST the command with ``?stream=true``; yields the NDJSON lines as they arrive."""
        path = f"/tunnel/{session_id}/exec"
        url = f"{self.base_url}{path}"
        timeout = httpx.Timeout(
            self.timeout_s,
            connect=min(CONNECT_TIMEOUT_S, self.timeout_s),
            read=command_timeout_s + STREAM_READ_MARGIN_S,
        )
        request = self._http.build_request(
            "POST",
            path,
            json=dict(body),
            params={"stream": "true"},
            headers={"Accept": "application/x-ndjson"},
            timeout=timeout,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise NetworkError(url, "no answer in time") from exc
        except httpx.TransportError as exc:
            raise NetworkError(url, str(exc) or type(exc).__name__) from exc
        try:
            if response.is_error:
                raise error_from_response(response, await response.aread())
            yield _lines(response, url)
        finally:
            await response.aclose()


async def _lines(response: httpx.Response, url: str) -> AsyncIterator[str]:
    try:
        async for line in response.aiter_lines():
            if line.strip():
                yield line
    except httpx.TimeoutException as exc:
        raise NetworkError(url, "the output stream stalled past the command's timeout") from exc
    except httpx.TransportError as exc:
        raise NetworkError(url, f"the output stream broke ({exc or type(exc).__name__})") from exc
