"""A one-line progress bar on stderr (done/total, rate, time left), for `ask` and `eval`.

Left out on purpose: any dependency (tqdm), nested bars, terminals that cannot return the carriage.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """Callable progress(done, total) drawing `label [#####     ] done/total unit rate/s N s left`."""

    def __init__(self, label, unit="tokens", stream=None):
        self.t0, self.label, self.unit = time.perf_counter(), label, unit
        self.stream = stream or sys.stderr

    def __call__(self, done, total):
        dt = time.perf_counter() - self.t0
        rate = done / max(dt, 1e-9)
        bar = "#" * int(30 * done / max(total, 1))
        self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{total} {self.unit} "
                          f"{rate:.1f}/s {(total - done) / max(rate, 1e-9):.0f} s left ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
