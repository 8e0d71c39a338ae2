"""Every dependency of every API route runs on the event loop, none in the thread pool."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute, APIWebSocketRoute

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.main import create_app


def _calls(dependant: Any) -> Iterator[tuple[str, Any]]:
    for sub in dependant.dependencies:
        yield getattr(sub.call, "__qualname__", repr(sub.call)), sub.call
        yield from _calls(sub)


def _routes(routes: list[Any]) -> Iterator[APIRoute | APIWebSocketRoute]:
    for route in routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            yield route
        included = getattr(route, "original_router", None)  # an included APIRouter
        if included is not None:
            yield from _routes(included.routes)


def _on_the_loop(call: Any) -> bool:
    return (
        inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
        or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004
    )


def test_no_route_depends_on_a_plain_function() -> None:
    """FastAPI runs a plain ``def`` dependency in its thread pool: a thread hop per dependency
    per request (they only read app.state). Every one is ``async def``."""
    app = create_app(ApiSettings(jwt_secret="s" * 40))
    routes = list(_routes(app.routes))
    assert len(routes) >= 11
    seen: set[str] = set()
    for route in routes:
        for name, call in _calls(route.dependant):
            seen.add(name)
            assert _on_the_loop(call), f"{route.path} depends on {name}, a plain function"
    assert {"get_settings", "get_bus", "get_work", "get_current_user"} <= seen
