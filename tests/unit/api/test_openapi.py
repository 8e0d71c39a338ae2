"""The OpenAPI document names every error a route can answer, with the one error body."""

from __future__ import annotations

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.main import create_app


def test_every_api_route_documents_its_errors_with_the_error_body() -> None:
    """Each /api/v1 route lists 401, 422 and 503 (401 too for token issue) as ErrorBody."""
    spec = create_app(ApiSettings(jwt_secret="s" * 40)).openapi()
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    routes = [
        (path, method, op)
        for path, ops in spec["paths"].items()
        if path.startswith("/api/v1/")
        for method, op in ops.items()
    ]
    assert len(routes) >= 11
    for path, method, op in routes:
        responses = op["responses"]
        for status in ("401", "422", "503"):
            assert status in responses, f"{method.upper()} {path} does not document {status}"
            assert responses[status]["content"]["application/json"]["schema"] == ref
    open_op = spec["paths"]["/api/v1/tunnel/open"]["post"]["responses"]
    assert {"403", "404", "409", "504"} <= set(open_op)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
