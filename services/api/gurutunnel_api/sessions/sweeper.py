"""The periodic sweep of stale ``pending`` sessions, owned by the application lifespan.

``run_sweeper`` calls :func:`.service.sweep_stale_pending` every ``pending_sweep_interval_s``
(each sweep bounded by ``request_timeout_s`` per statement and by the batch size), logs and
survives a failed sweep, and ends as soon as its task is cancelled at shutdown. It is the close
path of an open that died between inserting ``pending`` and failing it (API killed, a cancelled
open whose clean-up could not reach the database).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..bus import Bus
from ..config import ApiSettings
from .service import sweep_stale_pending

log = logging.getLogger(__name__)


async def run_sweeper(
    sessionmaker: async_sessionmaker[AsyncSession], *, bus: Bus, settings: ApiSettings
) -> None:
    """Sweep forever (until cancelled)."""
    # a sweep touches at most ``pending_sweep_batch`` agents, each a few bounded statements
    bound_s = settings.request_timeout_s * (2 + 2 * settings.pending_sweep_batch)
    while True:
        await asyncio.sleep(settings.pending_sweep_interval_s)
        try:
            failed = await asyncio.wait_for(
                sweep_stale_pending(sessionmaker, bus=bus, settings=settings), bound_s
            )
        except Exception as exc:
            log.warning("pending sweep failed", extra={"error": type(exc).__name__})
            continue
        if failed:
            log.info("pending sweep failed stale sessions", extra={"count": failed})
