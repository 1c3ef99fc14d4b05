"""Progress of long work (model loads, `bench compare`, `autoscale simulate`) on stderr.

On a terminal it is a tqdm bar, as vLLM and Hugging Face show. Elsewhere (a log file, CI, a pipe, `conveyor serve`
under a supervisor) a bar's carriage returns make one unreadable line, so it is a plain line through `emit` (a
logger's info for the loader, so JSON logs stay JSON) at most every `every_s` seconds. Either way nothing shows
until the work has lasted `after_s` seconds: fast work (every test) prints nothing. `TQDM_DISABLE=1` turns the bar
off, as for any tqdm bar; `disable=True` turns both off.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm


def _stderr_line(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """12 s, 3m05s, 1h02m: what a person reads at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`total` units of work (tensors, requests, simulated seconds), advanced with update(n).

    tty: None asks sys.stderr. emit: where plain lines go off a terminal (default: stderr, '# '-prefixed)."""

    def __init__(self, total: float, desc: str, unit: str = "it", *, emit: Callable[[str], None] | None = None,
                 every_s: float = 5.0, after_s: float = 2.0, tty: bool | None = None, disable: bool = False):
        assert total >= 0 and every_s >= 0 and after_s >= 0
        self.total, self.desc, self.unit = total, desc, unit
        self.n: float = 0
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._emit = emit or _stderr_line
        self._every_s, self._after_s = every_s, after_s
        self._t0 = time.monotonic()
        self._last_line: float | None = None
        self._last_n: float = 0
        self._closed = False
        self._quiet = disable or self.tty
        self._bar = None if disable or not self.tty else tqdm(
            total=total, desc=desc, unit=unit, file=sys.stderr, delay=after_s, dynamic_ncols=True)

    def update(self, n: float = 1) -> None:
        """Advance by n units; off a terminal, emits a line when one is due."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self._quiet:
            now = time.monotonic()
            due = self._t0 + self._after_s if self._last_line is None else self._last_line + self._every_s
            if now >= due:
                self._line(now)

    def add_total(self, more: float) -> None:
        """More work than first counted (a search that goes on)."""
        self.total += more
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def note(self, text: str) -> None:
        """A line that must be seen whatever the time (a phase starting): above the bar, or through emit."""
        if self._bar is not None:
            self._bar.write(f"# {text}", file=sys.stderr)
        elif not self._quiet:
            self._emit(text)

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before any progress."""
        elapsed = time.monotonic() - self._t0
        if self.n <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.n) * elapsed / self.n)

    def status(self) -> str:
        """'desc: 12/30 tensors (40%), 3 s elapsed, ~5 s left', or '..., done in 8 s'."""
        elapsed = time.monotonic() - self._t0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        head = f"{self.desc}: {self.n:,.0f}/{self.total:,.0f} {self.unit}{pct}"
        if self.n >= self.total:
            return f"{head}, done in {format_duration(elapsed)}"
        eta = self.eta_s()
        left = f", ~{format_duration(eta)} left" if eta is not None else ""
        return f"{head}, {format_duration(elapsed)} elapsed{left}"

    def _line(self, now: float) -> None:
        self._last_line, self._last_n = now, self.n
        self._emit(self.status())

    def close(self) -> None:
        """Ends the bar; off a terminal, a last line if any line was shown (so the log shows the end)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not self._quiet and self._last_line is not None and self._last_n != self.n:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOAD_EVERY_S = 5.0  # a model load's lines off a terminal: at most one per LOAD_EVERY_S
LOAD_AFTER_S = 2.0  # ... and none for a load shorter than this


def weight_load_progress(total: int, desc: str, unit: str = "tensors") -> Progress:
    """A model load's bar: tqdm on a terminal, else `conveyor.loader` log lines (JSON under `conveyor serve`)."""
    return Progress(total, desc, unit, emit=logging.getLogger("conveyor.loader").info, every_s=LOAD_EVERY_S,
                    after_s=LOAD_AFTER_S)
