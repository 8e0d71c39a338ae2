"""JSON-lines logging on stderr, with secrets scrubbed.

Contract: one JSON object per line with ``ts``, ``level``, ``logger``, ``msg`` and the ``extra``
fields a call passes (``session_id``, ``close_code``, ...). The agent never logs the credential
or a frame payload; as a second line of defence every line is passed through :func:`redact`,
which blanks ``Bearer`` tokens (websockets logs handshake headers at DEBUG) and anything shaped
like a JWT. websockets' own logger is held at INFO or above for the same reason.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_BEARER_RE = re.compile(r"(?i)(bearer\s+)\S+")
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# attributes every LogRecord has; anything else came from ``extra=``
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """``text`` with bearer tokens and JWT-shaped strings replaced by ``[redacted]``."""
    return _JWT_RE.sub("[redacted]", _BEARER_RE.sub(r"\1[redacted]", text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = isinstance(value, int | float | bool | None)
                entry[key] = value if plain else redact(str(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        # values are redacted one by one: redacting the serialized line could cut into JSON
        return json.dumps(entry, ensure_ascii=True)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as one JSON line."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs request headers (the Authorization header) at DEBUG
    logging.getLogger("websockets").setLevel(max(logging.getLevelName(level), logging.INFO))
