"""Progress for long steps: a tqdm bar on a terminal, log lines otherwise.

The library reports progress through callbacks only; these adapters turn them into something
a person can watch. Under DVC or CI stderr is not a terminal, so a bar would print thousands of
carriage returns into a log file: there, a line at most every ``interval`` seconds instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("ulmfit")


def use_bars() -> bool:
    """True when progress bars help: stderr is a terminal and tqdm is not disabled."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


class Progress:
    """``update(n)`` / ``set(done, total)`` / ``close()``; a bar or periodic log lines. As a
    context manager it closes on leaving, an error included (no bar left behind)."""

    def __init__(
        self,
        description: str,
        total: int | None = None,
        unit: str = "it",
        interval: float = 15.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = interval
        self.done = 0
        self._initial = 0  # where this process started counting (a resumed run: its step)
        self.postfix = ""
        self._log = log or logger.info
        self._last = time.monotonic()
        self._started = self._last
        self._bar = None
        if use_bars():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v:.4g}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._log(self._line())

    def set(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.update(done - self.done)

    def start_at(self, done: int) -> None:
        """Continue from ``done`` (a resumed run): the bar and the lines count on from there,
        and rates cover only the work done since."""
        self.done = self._initial = done
        self._started = self._last = time.monotonic()
        if self._bar is not None:
            self._bar.reset(self.total)
            self._bar.initial = self._bar.n = self._bar.last_print_n = done
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log(self._line() + " (done)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._started
        amount = f"{self.done:,}" + (f"/{self.total:,}" if self.total else "")
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        rate = f", {(self.done - self._initial) / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        return f"{self.description}: {amount} {self.unit}{percent} in {elapsed:.0f}s{rate}{extra}"


class StageProgress:
    """The corpora's ``progress(stage, done, total)`` callback: one :class:`Progress` per stage."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._current: Progress | None = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != self._stage or self._current is None:
            if self._current is not None:
                self._current.close()
            self._stage = stage
            self._current = Progress(f"{self.prefix} {stage}", total)
        self._current.set(done, total)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
