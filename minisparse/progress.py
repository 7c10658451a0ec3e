"""A progress bar on stderr (done/total, rate, time left), for `ask` and `eval`.

On a terminal it is one line redrawn with `\r`; written to a file or a pipe (a log) it is a few
plain lines, one per quarter of the work, since a log cannot return the carriage. Used as a
context manager it ends its line when the work is interrupted, so the next message starts on a
line of its own. Left out on purpose: any dependency (tqdm), nested bars.
"""
from __future__ import annotations

import sys
import time

PLAIN_LINES = 4         # lines written to a non-terminal: at 25%, 50%, 75% and 100%


class Progress:
    """Callable progress(done, total) drawing `label [#####     ] done/total unit rate/s N s left`.

    >>> import io
    >>> log = io.StringIO()
    >>> with Progress("prefill", stream=log) as bar:
    ...     for done in range(1, 9):
    ...         bar(done, 8)
    >>> [line.split("]")[1].split()[0] for line in log.getvalue().splitlines()]
    ['2/8', '4/8', '6/8', '8/8']
    """

    def __init__(self, label, unit="tokens", stream=None):
        self.t0, self.label, self.unit = time.perf_counter(), label, unit
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.open = False            # a redrawn line is on screen without its newline
        self.next_line = 1           # non-terminal: the next quarter to report

    def __call__(self, done, total):
        dt = time.perf_counter() - self.t0
        rate = done / max(dt, 1e-9)
        bar = "#" * int(30 * done / max(total, 1))
        text = (f"{self.label} [{bar:<30}] {done}/{total} {self.unit} "
                f"{rate:.1f}/s {(total - done) / max(rate, 1e-9):.0f} s left")
        if self.tty:
            self.stream.write(f"\r{text} ")
            self.open = done < total
            if not self.open:
                self.stream.write("\n")
        else:
            if done * PLAIN_LINES < self.next_line * max(total, 1) and done < total:
                return
            self.stream.write(text + "\n")
            while self.next_line * max(total, 1) <= done * PLAIN_LINES:
                self.next_line += 1
        self.stream.flush()

    def close(self):
        """End a line left open (the work stopped before `done == total`)."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
