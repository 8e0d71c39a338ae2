"""``gurutunnel shell``: an interactive shell on the agent through the API's WebSocket.

Contract:
- Gets a single-use ticket (``POST .../ws-ticket``), opens ``.../ws?ticket=`` (the long-lived
  token never goes in a URL, and the ticket never appears in an error message), sends
  ``shell{cols, rows}`` with the local terminal's size and waits at most ``open_timeout_s`` for
  ``started``.
- Then, with the local terminal in raw mode (restored on every exit path: return, error,
  cancellation, SIGTERM/SIGHUP), stdin bytes go out as ``input``, a size change (SIGWINCH) as
  ``resize``, ``chunk`` data is written to stdout; a ``gap`` shows a notice on stderr.
- It ends with the shell's ``exit`` (exit code per ``errors.exit_code_for``) or when the session
  closes (``session.closed``: 255). Close code 4401 (ticket refused) raises ``AuthError``; 4409
  (session not active) ``ApiError(conflict)``; any other loss of the socket ``NetworkError``.
- The terminal is behind the ``Terminal`` protocol so the loop runs without a tty in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .client import ApiClient
from .errors import EXIT_SESSION_CLOSED, ApiError, AuthError, CliError, NetworkError, exit_code_for
from .wire import (
    WsChunk,
    WsError,
    WsExit,
    WsGap,
    WsInput,
    WsResize,
    WsSessionClosed,
    WsShellOpen,
    WsStarted,
    decode_ws_message,
    encode,
    gap_notice,
)

OPEN_TIMEOUT_S = 15.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
CLOSE_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
READ_CHUNK_BYTES = 65536
CLOSE_TICKET_REFUSED = 4401
CLOSE_SESSION_NOT_ACTIVE = 4409


class Terminal(Protocol):
    """The local end of the shell: what ``run_shell`` needs from a terminal."""

    def size(self) -> tuple[int, int]:
        """(cols, rows)."""
        ...

    def raw_mode(self) -> AbstractContextManager[None]:
        """Raw input for the duration of the block, the previous mode restored after it."""
        ...

    def start_input(self, on_data: Callable[[bytes], None]) -> Callable[[], object]:
        """Call ``on_data`` (in the loop) with each read; ``b""`` at end of input. Returns stop."""
        ...

    def watch_resize(self, on_resize: Callable[[], None]) -> Callable[[], object]:
        """Call ``on_resize`` (in the loop) when the size changes. Returns stop."""
        ...

    def write(self, data: bytes) -> None:
        """Shell output, written and flushed."""
        ...

    def notice(self, text: str) -> None:
        """A line of the CLI's own (stderr), readable in raw mode too."""
        ...


class LocalTerminal:
    """The process's own stdin/stdout/stderr (a tty or not)."""

    def __init__(self) -> None:
        self.fd_in = sys.stdin.fileno()
        self.fd_out = sys.stdout.fileno()
        self.is_tty = os.isatty(self.fd_in)

    def size(self) -> tuple[int, int]:
        for fd in (self.fd_out, self.fd_in):
            with contextlib.suppress(OSError):
                s = os.get_terminal_size(fd)
                return max(1, min(s.columns, 1000)), max(1, min(s.lines, 1000))
        return 80, 24

    @contextlib.contextmanager
    def raw_mode(self) -> Iterator[None]:
        if not self.is_tty:
            yield
            return
        saved = termios.tcgetattr(self.fd_in)
        tty.setraw(self.fd_in)
        try:
            yield
        finally:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, saved)

    def start_input(self, on_data: Callable[[bytes], None]) -> Callable[[], object]:
        loop = asyncio.get_running_loop()
        fd = self.fd_in

        def readable() -> None:
            try:
                data = os.read(fd, READ_CHUNK_BYTES)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
            on_data(data)

        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError):
            # a regular file cannot be polled: read it in a daemon thread instead
            def pump() -> None:
                while True:
                    try:
                        data = os.read(fd, READ_CHUNK_BYTES)
                    except OSError:
                        data = b""
                    with contextlib.suppress(RuntimeError):  # the loop may be closed already
                        loop.call_soon_threadsafe(on_data, data)
                    if not data:
                        return

            threading.Thread(target=pump, name="gurutunnel-stdin", daemon=True).start()
            return lambda: None
        return lambda: loop.remove_reader(fd)

    def watch_resize(self, on_resize: Callable[[], None]) -> Callable[[], object]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGWINCH, on_resize)
        return lambda: loop.remove_signal_handler(signal.SIGWINCH)

    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def notice(self, text: str) -> None:
        # in raw mode "\n" does not return the carriage: spell it out
        sys.stderr.write(f"\r\n{text}\r\n" if self.is_tty else f"{text}\n")
        sys.stderr.flush()


def _closed_error(code: int | None, reason: str, url: str) -> CliError:
    if code == CLOSE_TICKET_REFUSED:
        return AuthError(f"the API refused the WebSocket ticket ({reason or 'no reason'})")
    if code == CLOSE_SESSION_NOT_ACTIVE:
        return ApiError(409, "conflict", reason or "the session is not active")
    return NetworkError(url, f"the WebSocket closed (code {code}) before the shell ended")


def _code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


def _reason(exc: ConnectionClosed) -> str:
    return exc.rcvd.reason if exc.rcvd is not None else ""


async def _open_shell(ws: ClientConnection, terminal: Terminal, open_timeout_s: float) -> str:
    cols, rows = terminal.size()
    await ws.send(encode(WsShellOpen(cols=cols, rows=rows)))
    async with asyncio.timeout(open_timeout_s):
        while True:
            msg = decode_ws_message(await ws.recv())
            if isinstance(msg, WsStarted):
                return msg.channel_id
            if isinstance(msg, WsError):
                raise ApiError(0, msg.code, msg.message)
            if isinstance(msg, WsSessionClosed):
                err = CliError("session_closed", f"the session closed ({msg.reason})")
                err.exit_code = EXIT_SESSION_CLOSED
                raise err


async def _pump_input(
    ws: ClientConnection,
    channel_id: str,
    queue: asyncio.Queue[bytes],
    resized: asyncio.Event,
    terminal: Terminal,
) -> None:
    """Forward stdin bytes and size changes until the end of input."""

    async def resizes() -> None:
        while True:
            await resized.wait()
            resized.clear()
            cols, rows = terminal.size()
            await ws.send(encode(WsResize(channel_id=channel_id, cols=cols, rows=rows)))

    resize_task = asyncio.create_task(resizes())
    try:
        while data := await queue.get():
            await ws.send(encode(WsInput(channel_id=channel_id, data=data)))
        # end of local input: nothing more to send; the shell's output still comes in
        await resize_task
    finally:
        resize_task.cancel()


async def _read_output(ws: ClientConnection, channel_id: str, terminal: Terminal) -> int | None:
    async for raw in ws:
        msg = decode_ws_message(raw)
        if isinstance(msg, WsChunk) and msg.channel_id == channel_id:
            terminal.write(msg.data)
        elif isinstance(msg, WsGap) and msg.channel_id == channel_id:
            terminal.notice(gap_notice(msg.from_seq, msg.to_seq))
        elif isinstance(msg, WsExit) and msg.channel_id == channel_id:
            return exit_code_for(msg.reason, msg.exit_code)
        elif isinstance(msg, WsSessionClosed):
            terminal.notice(f"[gurutunnel: session closed ({msg.reason})]")
            return EXIT_SESSION_CLOSED
        elif isinstance(msg, WsError):
            terminal.notice(f"gurutunnel: {msg.code}: {msg.message}")
            if msg.channel_id in (None, channel_id):
                return 1
    # the server closed cleanly (1000/1001) without an exit or session.closed message
    return None


async def run_shell(
    client: ApiClient,
    session_id: str,
    terminal: Terminal,
    *,
    open_timeout_s: float = OPEN_TIMEOUT_S,
    ping_interval_s: float = PING_INTERVAL_S,
    ping_timeout_s: float = PING_TIMEOUT_S,
) -> int:
    """Run the interactive shell to its end; returns the CLI exit code."""
    ticket = str((await client.ws_ticket(session_id))["ticket"])
    url = client.ws_url(session_id, ticket)
    shown_url = url.split("?", 1)[0]  # the ticket is a credential: never print it
    try:
        ws = await connect(
            url,
            open_timeout=open_timeout_s,
            ping_interval=ping_interval_s,
            ping_timeout=ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=MAX_MESSAGE_BYTES,
        )
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        raise NetworkError(shown_url, f"WebSocket connect failed ({exc})") from exc
    async with ws:
        try:
            channel_id = await _open_shell(ws, terminal, open_timeout_s)
        except TimeoutError as exc:
            raise NetworkError(shown_url, f"no shell started within {open_timeout_s:g}s") from exc
        except ConnectionClosed as exc:
            raise _closed_error(_code(exc), _reason(exc), shown_url) from exc
        return await _interact(ws, channel_id, terminal, shown_url)


async def _interact(ws: ClientConnection, channel_id: str, terminal: Terminal, url: str) -> int:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    resized = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None
    signalled: list[int] = []
    stops: list[Callable[[], object]] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        main.cancel()

    with terminal.raw_mode():
        try:
            # a SIGTERM/SIGHUP must still leave through the finally that restores the tty
            for sig in (signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, on_signal, sig)
                    stops.append(functools.partial(loop.remove_signal_handler, sig))
            stops.append(terminal.start_input(queue.put_nowait))
            stops.append(terminal.watch_resize(resized.set))
            pump = asyncio.create_task(_pump_input(ws, channel_id, queue, resized, terminal))
            try:
                code = await _read_output(ws, channel_id, terminal)
                if code is None:
                    raise _closed_error(ws.close_code, ws.close_reason or "", url)
                return code
            except ConnectionClosed as exc:
                raise _closed_error(_code(exc), _reason(exc), url) from exc
            except asyncio.CancelledError:
                if not signalled:
                    raise
                err = CliError("terminated", f"stopped by signal {signalled[0]}")
                err.exit_code = 128 + signalled[0]
                raise err from None
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await pump
        finally:
            for stop in reversed(stops):
                with contextlib.suppress(Exception):
                    stop()
