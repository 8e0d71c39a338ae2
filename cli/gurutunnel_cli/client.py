"""The technician REST client: one ``httpx.AsyncClient`` with a bounded timeout on every call.

Contract: every method returns the API's decoded JSON or raises a ``CliError``:
``AuthError`` for 401, ``ApiError`` (with the API's ``code`` and ``message``) for any other
non-2xx answer, ``NetworkError`` (naming the URL) when the API cannot be reached or a transfer
breaks. The transport is injectable (``httpx.MockTransport`` in unit tests).

File transfer (the README's "Inside a session"): ``put_file`` streams an async iterable as the
request body with an explicit ``Content-Length`` (never chunked, never held whole); a 409 carrying
``X-Upload-Offset`` raises ``UploadOffsetConflict``. ``download`` yields the streamed response of
``GET .../files`` (200 or 206); a 416 raises ``RangeNotSatisfiable`` with its headers. Streaming
calls bound each read and write (``timeout_s``), not the whole transfer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from .errors import ApiError, AuthError, NetworkError

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
STREAM_READ_MARGIN_S = 30.0
"""An exec stream may be silent for the command's whole timeout; the read waits this much more."""
UPLOAD_ANSWER_TIMEOUT_S = 120.0
"""After the last byte of an upload the agent verifies the SHA-256 and renames: wait this long."""

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


class UploadOffsetConflict(ApiError):
    """409 with ``X-Upload-Offset``: the agent holds ``offset`` bytes, not what we sent from."""

    def __init__(self, status: int, code: str, message: str, offset: int) -> None:
        super().__init__(status, code, message)
        self.offset = offset


class RangeNotSatisfiable(ApiError):
    """416: the ``Range`` start is at or beyond the remote file's size."""

    def __init__(self, status: int, code: str, message: str, headers: httpx.Headers) -> None:
        super().__init__(status, code, message)
        self.headers = headers


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

    # ------------------------------------------------------------------ files
    async def upload_offset(self, session_id: str, path: str, size: int, sha256: str) -> int:
        """How many bytes of this exact content the agent already holds (0 when none)."""
        body: JsonObject = await self.request(
            "POST",
            f"/tunnel/{session_id}/files/upload-offset",
            json_body={"path": path, "size": size, "sha256": sha256},
        )
        offset = body.get("offset") if isinstance(body, dict) else None
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
            raise ApiError(200, "bad_response", f"upload-offset answered {body!r}")
        return offset

    async def put_file(
        self,
        session_id: str,
        remote_path: str,
        content: AsyncIterable[bytes],
        *,
        length: int,
        sha256: str,
        content_range: str | None,
        overwrite: bool,
    ) -> JsonObject:
        """PUT ``content`` (exactly ``length`` bytes) to ``remote_path``; returns the 201 body."""
        path = f"/tunnel/{session_id}/files"
        url = f"{self.base_url}{path}"
        # an explicit Content-Length makes httpx send the iterable as a plain body, not chunked
        headers = {"Content-Length": str(length), "X-Content-SHA256": sha256}
        if content_range is not None:
            headers["Content-Range"] = content_range
        request = self._http.build_request(
            "PUT",
            path,
            params={"path": remote_path, "overwrite": "true" if overwrite else "false"},
            headers=headers,
            content=content,
            timeout=self._transfer_timeout(read_s=UPLOAD_ANSWER_TIMEOUT_S),
        )
        try:
            response = await self._http.send(request)
        except httpx.TimeoutException as exc:
            raise NetworkError(url, f"the upload stalled ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise NetworkError(url, f"the upload broke ({exc or type(exc).__name__})") from exc
        if response.is_error:
            error = error_from_response(response)
            offset = response.headers.get("X-Upload-Offset")
            if response.status_code == 409 and offset is not None and offset.isdigit():
                raise UploadOffsetConflict(
                    response.status_code, error.code, error.message, int(offset)
                )
            raise error
        try:
            body: JsonObject = response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "bad_response", f"{url}: not JSON") from exc
        return body

    @asynccontextmanager
    async def download(
        self, session_id: str, remote_path: str, start: int
    ) -> AsyncIterator[httpx.Response]:
        """GET ``remote_path`` from byte ``start`` (``Range`` when > 0); yields the 200/206."""
        path = f"/tunnel/{session_id}/files"
        url = f"{self.base_url}{path}"
        request = self._http.build_request(
            "GET",
            path,
            params={"path": remote_path},
            # identity: Content-Length and the Range offsets must count the file's own bytes
            headers={
                "Accept-Encoding": "identity",
                **({"Range": f"bytes={start}-"} if start else {}),
            },
            timeout=self._transfer_timeout(read_s=self.timeout_s),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise NetworkError(url, f"no answer within {self.timeout_s:g}s") from exc
        except httpx.TransportError as exc:
            raise NetworkError(url, str(exc) or type(exc).__name__) from exc
        try:
            if response.is_error:
                try:
                    raw = await response.aread()
                except httpx.TransportError as exc:
                    raise NetworkError(url, str(exc) or type(exc).__name__) from exc
                error = error_from_response(response, raw)
                if response.status_code == 416:
                    raise RangeNotSatisfiable(416, error.code, error.message, response.headers)
                raise error
            yield response
        finally:
            await response.aclose()

    def _transfer_timeout(self, *, read_s: float) -> httpx.Timeout:
        # each read and write is bounded, the transfer as a whole is not: a big file may take hours
        return httpx.Timeout(
            self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s), read=read_s
        )

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
