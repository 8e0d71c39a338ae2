"""``gurutunnel-agent`` command line: settings, logging, the connect loop, exit codes.

Exit codes:
- 0: stopped by SIGINT or SIGTERM (the socket is closed with code 1000 first);
- 1: bad configuration (a one-line summary of what is wrong on stderr, never a secret);
- 2: refused by the gateway for good (HTTP 401/403 at the upgrade, or a fatal close code), with
  a one-line message on stderr such as ``gurutunnel-agent: credential refused by gateway
  (HTTP 401 unauthorized); not retrying``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .client import AgentClient, FatalRefusal
from .config import CONFIG_FILE_ENV, AgentSettings, ConfigError, load_settings
from .logs import setup_logging

PROG = "gurutunnel-agent"
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_REFUSED = 2


def summarize_validation_error(exc: ValidationError) -> str:
    """``field (ENV_VAR): message; ...`` without the offending values (they may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(p) for p in err["loc"])
        where = f"{name} (GT_AGENT_{name.upper()})" if name else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hold one WebSocket to a gurutunnel gateway; settings from GT_AGENT_* env.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML settings file (default: ${CONFIG_FILE_ENV}); the environment overrides it",
    )
    return parser


async def _run(client: AgentClient) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not available on Windows' event loop: Ctrl+C then ends asyncio.run with
        # KeyboardInterrupt, which main() also maps to exit code 0
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, client.stop)
    await client.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until a signal (0), a bad configuration (1) or a fatal refusal (2)."""
    args = _parser().parse_args(argv)
    try:
        settings: AgentSettings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{PROG}: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValidationError as exc:
        print(f"{PROG}: invalid configuration: {summarize_validation_error(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    client = AgentClient(settings)
    try:
        asyncio.run(_run(client))
    except FatalRefusal as exc:
        logging.getLogger(__name__).error(
            "refused by the gateway; not retrying", extra={"reason": exc.reason}
        )
        print(f"{PROG}: {exc.reason}; not retrying", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
