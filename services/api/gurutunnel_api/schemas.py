"""Shared HTTP schema pieces: the strict request base and the error body."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are refused (no mass assignment)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """``{"error": {"code", "message"}}``: the body of every error response."""

    error: ErrorDetail


_DESCRIPTIONS: dict[int, str] = {
    401: "`unauthorized`: missing, invalid or expired technician token",
    403: "`forbidden`: the role or ownership does not allow this",
    404: "`not_found`: no such object",
    409: "`session_exists`, `agent_offline`, `agent_busy` or `conflict`",
    422: "`validation_error`: malformed id, body, query or unknown field; "
    "`cwd_not_allowed` / `invalid_command`: refused by the agent",
    429: "`too_many_channels`: the agent runs as many channels as it allows",
    502: "`agent_error`: the agent answered with an unexpected error",
    503: "`database_unavailable`, `bus_unavailable` or `service_unavailable`",
    504: "`agent_timeout`: the agent did not answer in time",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` for the error statuses a route documents (always 422 and 503)."""
    wanted = sorted({*statuses, 422, 503})
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in wanted}
