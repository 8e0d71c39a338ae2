"""gurutunnel agent: holds one WebSocket to a gateway and serves tunnel sessions on this machine.

Entry point ``gurutunnel-agent`` (:func:`gurutunnel_agent.main.main`). Modules: ``config``
(settings), ``client`` (connect loop), ``tunnel`` (sans-I/O state machine), ``metrics``
(psutil), ``logs`` (JSON lines), ``channels`` (the seam for command execution).
"""
