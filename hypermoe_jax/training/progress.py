"""Progress of long loops -- train steps, eval batches, decoding batches -- as printed lines:
the count, the rate (steps or batches per second, tokens per second), the time elapsed and an
ETA, at most every ``INTERVAL_S`` seconds, and a summary at the end of work that took that long.

    eval k=2: batch 120/400  3.41 batches/s  6980 tok/s  elapsed 35s  ETA 1m22s
    eval k=2: 400 batches in 2m01s (3.31 batches/s, 6772 tok/s)

Only process 0 prints (``process0_print``). Rates between lines leave out the first step or
batch, which includes the compilation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

INTERVAL_S = 30.0  # seconds between progress lines (at most)

_PLURAL = {"step": "steps", "batch": "batches"}


def process0_print(verbose: bool = True) -> Callable[..., None]:
    """``print`` on process 0 (when ``verbose``); on the other processes, nothing."""
    if verbose and jax.process_index() == 0:
        return print
    return lambda *args, **kwargs: None


def duration(seconds: float) -> str:
    """``0.4s``, ``35s``, ``3m05s``, ``2h07m``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts the steps (or batches) and tokens of a loop and prints a line when one is due.

    ``total``: the count shown as the end (None: unknown, no ETA); ``end``: the count the ETA
    is for (default ``total``; a run that stops early); ``start``: the count before the loop (a
    resumed run's step). ``interval_s`` defaults to ``INTERVAL_S`` (read when made).
    """

    def __init__(self, label: str, *, unit: str = "batch", total: int | None = None,
                 end: int | None = None, start: int = 0,
                 say: Callable[[str], None] | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.total = label, unit, total
        self.end = total if end is None else end
        self.say = process0_print() if say is None else say
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.count = self.start = start
        self.tokens = 0
        self.started = self._last_line = clock()
        self._window: tuple[float, int, int] | None = None  # (time, count, tokens) it starts at
        self.lines = 0

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        """Counts ``n`` more steps (batches) of ``tokens`` tokens."""
        first = self.count == self.start
        self.count += n
        self.tokens += tokens
        if first:  # rates start after the first one (compilation)
            self._window = (self.clock(), self.count, self.tokens)

    def update(self, n: int = 1, tokens: int = 0) -> None:
        """``advance``, and print a line when the last one is ``interval_s`` old."""
        self.advance(n, tokens)
        if self.due():
            self.say(self.line())

    def due(self) -> bool:
        return self.clock() - self._last_line >= self.interval_s

    def rates(self) -> tuple[float, float]:
        """(steps or batches per second, tokens per second) since the last line, and starts
        the next window: call once per printed line."""
        now = self.clock()
        t0, c0, k0 = self._window or (self.started, self.start, 0)
        if now - t0 <= 0 or self.count == c0:
            t0, c0, k0 = self.started, self.start, 0
        dt = max(now - t0, 1e-9)
        self._window = (now, self.count, self.tokens)
        self._last_line = now
        self.lines += 1
        return (self.count - c0) / dt, (self.tokens - k0) / dt

    def eta(self, rate: float) -> float | None:
        """Seconds to ``end`` at ``rate``; None when unknown or there."""
        if self.end is None or rate <= 0 or self.count >= self.end:
            return None
        return (self.end - self.count) / rate

    def line(self) -> str:
        """``label: unit count/total  rate  tok/s  elapsed  ETA``."""
        rate, tok_rate = self.rates()
        count = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        parts = [f"{self.label}: {self.unit} {count}", f"{rate:.2f} {_PLURAL[self.unit]}/s",
                 f"{tok_rate:.0f} tok/s", f"elapsed {duration(self.clock() - self.started)}"]
        eta = self.eta(rate)
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return "  ".join(parts)

    def done(self) -> None:
        """Prints the summary line -- when the work printed progress lines (took that long)."""
        if self.lines:
            self.say(self.summary())

    def summary(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        n = self.count - self.start
        return (f"{self.label}: {n} {_PLURAL[self.unit] if n != 1 else self.unit} in "
                f"{duration(elapsed)} ({n / elapsed:.2f} {_PLURAL[self.unit]}/s, "
                f"{self.tokens / elapsed:.0f} tok/s)")
