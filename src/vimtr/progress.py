"""Progress of long loops (evaluation, re-training, sweep, bench): a tqdm bar on a terminal, plain lines
when the output is piped or written to a file.

A bar redraws itself with carriage returns; in a log file those pile up into one line of ~100 KB. So the
bar is drawn only when its stream is a terminal; otherwise one line is printed each time the loop
passes another :data:`STEP_PERCENT` percent (and at the end), e.g. ``eval: 30% (108/360) 4.2 s``.
"""
from __future__ import annotations

import sys
import time

STEP_PERCENT = 10


def progress_bar(iterable=None, *, desc: str = "", total: int | None = None, initial: int = 0,
                 enabled: bool = True, stream=None):
    """Wrap ``iterable`` (or count by hand with ``update``): a tqdm bar when ``stream`` (default stderr) is
    a terminal, :class:`LineProgress` otherwise, a silent pass-through when not ``enabled``. All three take
    ``update(n)``, ``set_postfix(**values)`` and ``close()``."""
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if enabled and _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, file=stream, dynamic_ncols=True, leave=False)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, stream=stream, silent=not enabled)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """One line per :data:`STEP_PERCENT` percent done, then one at the end; nothing when ``silent``."""

    def __init__(self, iterable=None, *, desc="", total=None, initial=0, stream=None, silent=False):
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.stream, self.silent = stream if stream is not None else sys.stderr, silent
        self.postfix, self.start, self.closed = "", time.perf_counter(), False
        self.next_step = self._step_after(initial)

    def _step_after(self, n) -> int:
        """The next percentage (a multiple of STEP_PERCENT) to report, above the one ``n`` items reach."""
        if not self.total:
            return 101
        return (100 * n // self.total) // STEP_PERCENT * STEP_PERCENT + STEP_PERCENT

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1):
        self.n += n
        if self.total and 100 * self.n >= self.next_step * self.total and self.n < self.total:
            self._print()
            self.next_step = self._step_after(self.n)

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        if not self.closed:
            self.closed = True
            self._print()

    def _print(self):
        if self.silent:
            return
        done = f"{100 * self.n // self.total}% ({self.n}/{self.total})" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc + ': ' if self.desc else ''}{done} {time.perf_counter() - self.start:.1f} s{extra}",
              file=self.stream, flush=True)
