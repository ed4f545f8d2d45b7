"""Progress reporting that suits where the output goes.

On a terminal this is a tqdm bar. When stderr is not a terminal (CI, ``nohup``, a pipe, ``make demo > log``) a
redrawn bar would write one line per update, so :func:`track` prints one line when a phase starts, one at every
``step_percent`` of its work and one when it ends, with the elapsed time. tqdm has no mode that prints plain lines
at coarse steps (its ``mininterval`` still redraws with carriage returns), which is why the line mode is written here.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

__all__ = ["track"]


class _LineProgress:
    """A tqdm look-alike (iteration, ``update``, ``set_postfix``, ``close``) that prints a few whole lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, step_percent: float,
                 file: TextIO, initial: int = 0):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.file = desc, file
        self.step = max(step_percent, 1.0) / 100.0
        self.n = initial
        self.postfix = ""
        self._next = self.step
        if self.total and initial:  # a resumed phase: the next line is at the next step past where it resumed
            while self._next <= initial / self.total:
                self._next += self.step
        self._t0 = time.perf_counter()
        self._closed = False
        resumed = f" at {initial}/{self.total}" if initial and self.total else ""
        self._print("started" + (f" ({self.total} steps)" if self.total else "") + resumed)

    def _print(self, what: str) -> None:
        print(f"{self.desc}: {what}", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n < self.total and self.n / self.total >= self._next:
            while self._next <= self.n / self.total:
                self._next += self.step
            elapsed = time.perf_counter() - self._t0
            self._print(f"{100 * self.n / self.total:3.0f}% ({self.n}/{self.total}) {elapsed:.0f} s"
                        + (f" {self.postfix}" if self.postfix else ""))

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self, finished: bool = True) -> None:
        """The phase's last line: ``done in ...``, or ``stopped at N/TOTAL after ...`` when it did not finish (an
        exception or an interrupt left it), so that an interrupted run never reads as complete."""
        if not self._closed:
            self._closed = True
            elapsed = time.perf_counter() - self._t0
            if finished:
                what = f"done in {elapsed:.1f} s"
            else:
                what = f"stopped at {self.n}" + (f"/{self.total}" if self.total else "") + f" after {elapsed:.1f} s"
            self._print(what + (f" {self.postfix}" if self.postfix else ""))

    def __iter__(self) -> Iterator:
        finished = False
        try:
            for item in self.iterable:
                yield item
                self.update()
            finished = True
        finally:  # also when the loop body raised or stopped early (the generator is closed)
            self.close(finished)

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(finished=exc_type is None)


class _Silent(_LineProgress):
    def __init__(self, iterable: Iterable | None, total: int | None = None, initial: int = 0):  # noqa: D107
        self.iterable, self.total, self.n, self._closed = iterable, total, initial, True

    def _print(self, what: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        self.n += n


def track(iterable: Iterable | None = None, desc: str = "", total: int | None = None, enabled: bool = True,
          step_percent: float = 25.0, file: TextIO | None = None, initial: int = 0):
    """Wrap ``iterable`` (or count ``update()`` calls up to ``total``) with progress output.

    Args:
        enabled: False prints nothing.
        step_percent: in line mode (stderr not a terminal), print a line every this many percent.
        file: where to write (default ``sys.stderr``).
        initial: work already done before ``iterable``'s first item (a phase resumed part-way, e.g. an epoch).
    """
    file = file or sys.stderr
    if not enabled:
        return _Silent(iterable, total, initial)
    if getattr(file, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=file, initial=initial)
    return _LineProgress(iterable, total, desc, step_percent, file, initial)
