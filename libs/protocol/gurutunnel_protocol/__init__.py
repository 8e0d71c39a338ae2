"""gurutunnel wire protocol: messages, subjects, codec and error codes.

Imports only pydantic and the standard library. ``api``, ``gateway`` and ``agent`` import this
package and never each other.
"""

from .errors import CloseCode, ErrorCode, InvalidIdError, ProtocolError, close_is_fatal
from .ids import ID_PATTERN, Id, new_id, validate_id
from .messages import PROTOCOL_VERSION
from .subjects import DEFAULT_PREFIX, Subjects

__all__ = [
    "DEFAULT_PREFIX",
    "ID_PATTERN",
    "PROTOCOL_VERSION",
    "CloseCode",
    "ErrorCode",
    "Id",
    "InvalidIdError",
    "ProtocolError",
    "Subjects",
    "close_is_fatal",
    "new_id",
    "validate_id",
]
