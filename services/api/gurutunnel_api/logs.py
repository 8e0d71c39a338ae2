"""JSON log lines for the API: one object per line, never a secret.

Contract:
- :class:`JsonFormatter` writes ``{"ts", "level", "logger", "message"}`` plus, when a record
  carries them in ``extra``, only the allow-listed fields (``agent_id``, ``session_id``,
  ``conn_id``, ``gateway_id``, ``event_id``, ``error``, ``code``, ``kind``, ``frame_type``,
  ``count``) and ``exc`` for a trace. Anything else in ``extra`` is dropped, so a caller cannot
  leak a token, password or credential by passing it as an extra field.
- As a second line of defence, text that looks like a credential is masked in the message and
  the trace: JWTs (``eyJ...``), ``Bearer <x>``, argon2 hashes and the value of a ``ticket``
  query parameter (uvicorn logs every WebSocket upgrade with its query string, and the
  technician WebSocket carries its single-use ticket there).
- ``configure_logging(level)`` installs one stderr handler with the formatter on the root logger
  and routes ``uvicorn``'s loggers through it; ``uvicorn_log_config(level)`` is the same as a
  ``logging.config.dictConfig`` mapping for ``uvicorn.run(log_config=...)``.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any

ALLOWED_EXTRA = (
    "agent_id",
    "session_id",
    "conn_id",
    "gateway_id",
    "event_id",
    "error",
    "code",
    "kind",
    "frame_type",
    "count",
)

_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"  # JWT / JWS
    r"|(?i:bearer)\s+\S+"  # an Authorization value
    r"|\$argon2[a-z]*\$\S+"  # a password hash
    r"|(?<=[?&]ticket=)[^&\s\"']+"  # a WebSocket ticket in a logged URL
)
_MASK = "[redacted]"


def redact(text: str) -> str:
    """``text`` with anything credential-shaped masked."""
    return _SECRETS.sub(_MASK, text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module contract)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in ALLOWED_EXTRA:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """A ``dictConfig`` mapping: root and uvicorn's loggers through :class:`JsonFormatter`."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # no handlers of their own: they propagate to the root's JSON handler
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON handler on the root logger (and route uvicorn's loggers to it)."""
    logging.config.dictConfig(uvicorn_log_config(level))
