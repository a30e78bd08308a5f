"""Progress of long loops, always on stderr (results go to stdout): a tqdm bar on a terminal, else
a plain log line every `EVERY_S` seconds and one when the loop ends, e.g.

    normswap: perplexity (gpt2-rms): 120/1011 windows (12%), 30.7k tok, 1.0k tok/s, eta 14m20s
    normswap: perplexity (gpt2-rms): 1011/1011 windows done in 4m10s, 258.7k tok, 1.0k tok/s

so a run under `nohup`, CI or a recipe's log shows signs of life and an ETA instead of nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from normswap.log import logger

EVERY_S = 30.0  # seconds between lines off a terminal: often enough to see life, rare enough to read
FIRST_S = 10.0  # the first line comes sooner, so an ETA is known early


def format_duration(seconds: float) -> str:
    """0.4s, 45s, 3m07s, 2h05m: short and unambiguous in a log line."""
    if seconds < 9.95:
        return f"{max(seconds, 0):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_count(n: float) -> str:
    """980, 24.1k, 3.2M: counts and rates at a glance."""
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}" if abs(n) >= 10 or n == int(n) else f"{n:.1f}"


def short_name(name: object) -> str:
    """A model's name for progress lines: the last two parts of its path or Hub id
    (`gpt2-dyt/convert` in a recipe, `openai-community/gpt2`, `gpt2-rms`), not the whole path."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts[-2:]) or str(name)


class Progress:
    """One long loop's progress: `update(n, tokens=...)` after each piece of work, `close()` at the end.

    `enabled`: True a tqdm bar, False plain log lines, None (the default) a bar when stderr is a
    terminal and lines otherwise. `tokens` counts what the loop processed besides its units
    (scored tokens of a perplexity run): the lines then give tokens and tokens per second.
    `every_s`, `first_s` and `clock` exist for callers with other needs and for tests.
    """

    def __init__(self, total: int, desc: str, enabled: bool | None = None, unit: str = "it", *,
                 every_s: float | None = None, first_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, done_word: str = "done") -> None:
        self.desc, self.unit, self.done_word, self.clock = desc, unit, done_word, clock
        self.tty = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.every_s = EVERY_S if every_s is None else every_s
        self.first_s = min(FIRST_S if first_s is None else first_s, self.every_s)
        self._total, self.n, self.tokens, self.lines = int(total), 0, 0, 0
        self.postfix: dict[str, Any] = {}
        self.closed = False
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self._total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.restart()

    @property
    def disable(self) -> bool:
        """True when there is no bar (tqdm's name: callers ask it before writing their own lines)."""
        return self.bar is None

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:  # a loop that learns its size as it goes (zero-shot requests)
        self._total = int(value)
        if self.bar is not None:
            self.bar.total = self._total
            self.bar.refresh()

    def restart(self) -> None:
        """Count time (rates, ETA, the next line) from now: for callers whose setup precedes the work."""
        self.t0 = self.clock()
        self.next_line = self.t0 + self.first_s

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.n += n
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
            if tokens:
                self.bar.set_postfix(self._postfix(with_rate=True), refresh=False)
            return
        now = self.clock()
        if now >= self.next_line and self.n < self._total:
            self.lines += 1
            self.next_line = now + self.every_s
            logger.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        """Extra figures for the bar and the lines (a training loss)."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(with_rate=bool(self.tokens)), refresh=False)

    def _postfix(self, with_rate: bool) -> dict[str, str]:
        extra = dict(self.postfix)
        if with_rate:
            elapsed = max(self.clock() - self.t0, 1e-9)
            extra["tok"] = format_count(self.tokens)
            extra["tok/s"] = format_count(self.tokens / elapsed)
        return extra

    def line(self, now: float | None = None) -> str:
        """The progress line as of `now`: counts, rate and ETA."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        parts = [f"{self.desc}: {self.n}/{self._total} {self.unit}" + (f" ({100 * self.n / self._total:.0f}%)" if self._total else "")]
        if self.tokens:
            parts += [f"{format_count(self.tokens)} tok", f"{format_count(self.tokens / elapsed)} tok/s"]
        else:
            parts.append(f"{format_count(self.n / elapsed)} {self.unit}/s")
        if self.n and self._total:
            parts.append(f"eta {format_duration(elapsed / self.n * max(self._total - self.n, 0))}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def write(self, message: str) -> None:
        """A message between updates that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        """End the bar; off a terminal, one line saying the loop finished and how long it took."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        if self._total and self.n >= self._total:  # a loop cut short by an error says nothing here
            elapsed = self.clock() - self.t0
            rate = (f"{format_count(self.tokens)} tok, {format_count(self.tokens / max(elapsed, 1e-9))} tok/s" if self.tokens
                    else f"{format_count(self.n / max(elapsed, 1e-9))} {self.unit}/s")
            logger.info("%s: %d/%d %s %s in %s, %s", self.desc, self.n, self._total, self.unit, self.done_word,
                        format_duration(elapsed), rate)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool | None = None, unit: str = "it", **kwargs: Any) -> Progress:
    """A `Progress` (the name the evaluation loops have always used): a bar on a terminal, lines off it."""
    return Progress(total, desc, enabled, unit, **kwargs)
