"""Every table of the API, imported in one place (Alembic's ``target_metadata``)."""

from sqlmodel import SQLModel

from .agents.models import Agent, AgentConnection, GatewayLease
from .audit.models import TunnelAudit
from .auth.models import Technician
from .sessions.models import TechSession
from .work.models import WsTicket

metadata = SQLModel.metadata

__all__ = [
    "Agent",
    "AgentConnection",
    "GatewayLease",
    "TechSession",
    "Technician",
    "TunnelAudit",
    "WsTicket",
    "metadata",
]
