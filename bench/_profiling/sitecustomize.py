"""Profile this whole process with pyinstrument when ``GT_BENCH_PROFILE_OUT`` names a file.

``bench`` puts this directory on ``PYTHONPATH`` of the gateway or API it profiles
(``--profile gateway|api``); Python imports ``sitecustomize`` at startup, the profiler samples
the main thread (the event loop, idle time included) and the text report is written when the
process exits normally (SIGTERM: both services stop gracefully). ``GT_BENCH_PROFILE_ARG``, when
set, limits this to processes with that argument (``serve``: not the API's one-shot commands).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path

_out = os.environ.pop("GT_BENCH_PROFILE_OUT", "")
_when = os.environ.pop("GT_BENCH_PROFILE_ARG", "")
if _out and (not _when or _when in sys.argv[1:]):
    from pyinstrument import Profiler

    _profiler = Profiler(interval=0.001, async_mode="disabled")
    _profiler.start()

    def _write() -> None:
        if not _profiler.is_running:
            return
        _profiler.stop()
        text = _profiler.output_text(unicode=False, color=False, show_all=False)
        # then every function by its own time: where the CPU goes, idle (epoll) included
        text += "\n\nBy self time:\n" + _profiler.output_text(flat=True, flat_time="self")
        Path(_out.replace("{pid}", str(os.getpid()))).write_text(text)

    atexit.register(_write)

    # uvicorn re-raises the SIGTERM it handled once it has shut down, so the process dies by
    # the signal and atexit never runs: write the profile first.
    _raise_signal = signal.raise_signal

    def _write_then_raise(sig: int) -> None:
        _write()
        _raise_signal(sig)

    signal.raise_signal = _write_then_raise
