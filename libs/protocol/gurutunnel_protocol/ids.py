"""Identifier rules shared by messages and subjects.

Every id that may enter a NATS subject (agent ids, session ids, channel ids, gateway ids, conn
ids) matches ``ID_PATTERN``: 1-64 characters from ``[A-Za-z0-9_-]``. That excludes ``.``, ``*``,
``>``, whitespace and control characters, so an id can never add a token or a wildcard to a
subject. ``Id`` is the pydantic type that enforces it in every message.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from pydantic import StringConstraints

from .errors import InvalidIdError

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A subject-safe identifier."""


def validate_id(value: object, *, what: str = "id") -> str:
    """Return ``value`` if it is a subject-safe id, else raise ``InvalidIdError``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidIdError(f"invalid {what}: must match {ID_PATTERN}")
    return value


def new_id() -> str:
    """A fresh random id (UUID4 hex, 32 characters) that satisfies ``ID_PATTERN``."""
    return uuid.uuid4().hex
