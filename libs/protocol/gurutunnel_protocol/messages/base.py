"""Base class of every wire message.

Every frame is a JSON object with a ``type`` tag (dotted lowercase, the union discriminator) and
``v``, the protocol version. Unknown fields are ignored so that a newer peer can add optional
fields within the same version; an unknown ``type`` or a different ``v`` is refused.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

PROTOCOL_VERSION = 1


class Frame(BaseModel):
    """A wire message. Subclasses set ``type`` as a ``Literal`` with a default."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = PROTOCOL_VERSION


def _from_base64(value: Any) -> Any:
    # bytes stay bytes (Python callers); a str is base64 (JSON input), strictly validated
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("data must be standard base64") from exc
    return value


def _to_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


WireBytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(
        lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"
    ),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
"""Raw bytes in Python, standard base64 (RFC 4648, padded) in JSON."""
