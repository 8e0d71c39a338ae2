"""A disconnect's reason decides the close reason of the sessions bound to that connection."""

from __future__ import annotations

import pytest

from gurutunnel_protocol.messages import DisconnectReason

from .conftest import Api, EnrolledAgent, FakeGateway, Presence, Users
from .test_presence import audit_rows, open_session, session


@pytest.mark.parametrize(
    ("disconnect", "close_reason"),
    [
        (DisconnectReason.SHUTDOWN, "gateway_shutdown"),
        (DisconnectReason.LEASE_LOST, "gateway_lost"),
        (DisconnectReason.REVOKED, "revoked"),
        (DisconnectReason.REPLACED, "agent_disconnected"),
        (DisconnectReason.PING_TIMEOUT, "agent_disconnected"),
        (DisconnectReason.CLOSED, "agent_disconnected"),
    ],
)
async def test_disconnect_reason_maps_to_session_close_reason(
    api: Api,
    users: Users,
    agent: EnrolledAgent,
    gateway: FakeGateway,
    presence: Presence,
    disconnect: DisconnectReason,
    close_reason: str,
) -> None:
    """shutdown (drain) -> gateway_shutdown, lease_lost -> gateway_lost, revoked -> revoked; the
    agent's own link ending, or being replaced by a newer connection, -> agent_disconnected;
    one audit row."""
    await presence.send(gateway.connected())
    opened = await open_session(api, users, agent)

    event = gateway.disconnected().model_copy(update={"reason": disconnect})
    await presence.send(event)
    closed = await session(api, users, opened["id"])
    assert (closed["state"], closed["close_reason"]) == ("closed", close_reason)
    assert (await audit_rows(api, users, opened["id"]))[-1] == ("session.close", close_reason)
