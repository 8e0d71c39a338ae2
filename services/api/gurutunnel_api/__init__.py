"""gurutunnel API: technicians' REST API, session state machine and the API side of the bus.

Entry points: ``gurutunnel_api.main:create_app`` (ASGI factory) and the ``gurutunnel-api`` CLI
(``gurutunnel_api.cli:app``). Settings: ``gurutunnel_api.config.ApiSettings`` (``GT_API_*``).
"""
