"""Live training progress that is stored as one line.

:class:`LiveProgress` is a Keras callback for ``fit()``. While training runs
it rewrites a single line in place, the step count, the latest logs (loss,
accuracy, ...), the time spent and an estimate of the time left::

    step 120/500 · loss 0.812 · accuracy 0.734 · 12 s, about 38 s left

and when ``fit()`` returns the same line holds one compact summary::

    500 steps in 48 s · loss 0.412 · accuracy 0.881

In Jupyter the line is an IPython display updated through its display id, so
a saved notebook keeps only the last state of that one output (no per-step
spam, unlike Keras's ``verbose=1`` bar). In a terminal it is redrawn with a
carriage return; when the output is not a terminal (a log file, CI) only the
summary is printed.

>>> model.fit(dataset, steps_per_epoch=500, verbose=0, callbacks=[LiveProgress()])
"""

from __future__ import annotations

import math
import sys
import time

import keras


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _value(value) -> str | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # arrays (e.g. per-task weights) are not shown
        return None
    if math.isnan(number) or math.isinf(number):
        return str(number)
    return f"{number:.4g}" if abs(number) >= 1e-3 or number == 0 else f"{number:.2e}"


class LiveProgress(keras.callbacks.Callback):
    """One line of progress for ``fit()`` that ends as one summary line.

    ``unit``: what one training step is, for the line ("step", "episode",
    "meta-batch"). ``keys``: the logs to show, in order (default: every
    scalar log). ``every``: the least time in seconds between two redraws.
    ``stream``: where the plain-text form goes (default ``sys.stdout``).
    Use it with ``verbose=0``; the summary is also in :attr:`summary`.
    """

    def __init__(self, unit: str = "step", keys=None, every: float = 0.5, stream=None):
        super().__init__()
        if not isinstance(unit, str) or not unit.strip():
            raise ValueError(f"unit must be a non-empty string such as 'episode', got {unit!r}")
        if not isinstance(every, (int, float)) or every < 0:
            raise ValueError(f"every must be a non-negative number of seconds, got {every!r}")
        self.unit = unit.strip()
        self.keys = None if keys is None else list(keys)
        self.every = float(every)
        self.stream = stream
        self.summary = ""
        self._handle = None

    # -- the line ---------------------------------------------------------------
    def _plural(self, n: int) -> str:
        if n == 1:
            return self.unit
        return self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")

    def _logs_text(self, logs) -> str:
        logs = dict(logs or {})
        keys = self.keys if self.keys is not None else list(logs)
        parts = []
        for key in keys:
            if key in logs:
                text = _value(logs[key])
                if text is not None:
                    parts.append(f"{key} {text}")
        return " · ".join(parts)

    def progress_line(self, done: int, logs, elapsed: float) -> str:
        """The line shown after ``done`` steps, ``elapsed`` seconds in."""
        total = self._total
        count = f"{self.unit} {done}/{total}" if total else f"{self.unit} {done}"
        timing = _duration(elapsed)
        if total and done:
            timing += f", about {_duration(elapsed / done * (total - done))} left"
        return " · ".join(p for p in (count, self._logs_text(logs), timing) if p)

    def summary_line(self, done: int, logs, elapsed: float) -> str:
        """The line left when training ends."""
        head = f"{done} {self._plural(done)} in {_duration(elapsed)}"
        return " · ".join(p for p in (head, self._logs_text(logs)) if p)

    # -- output -------------------------------------------------------------------
    def _show(self, text: str, final: bool = False):
        if self._jupyter:
            from IPython.display import display

            if self._handle is None:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
            else:
                self._handle.update({"text/plain": text}, raw=True)
            return
        stream = self.stream or sys.stdout
        if getattr(stream, "isatty", lambda: False)():
            stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = max(self._width, len(text))
            stream.flush()
        elif final:
            stream.write(text + "\n")
            stream.flush()

    # -- Keras hooks -----------------------------------------------------------------
    def on_train_begin(self, logs=None):
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs") or 1
        self._total = steps * epochs if steps else None
        self._done, self._logs, self._width = 0, {}, 0
        self._jupyter = self.stream is None and _in_jupyter()
        self._handle = None
        self._start = self._last = time.perf_counter()
        self._show(self.progress_line(0, {}, 0.0))

    def on_train_batch_end(self, batch, logs=None):
        self._done += 1
        self._logs = dict(logs or {})
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._show(self.progress_line(self._done, self._logs, now - self._start))

    def on_epoch_end(self, epoch, logs=None):
        self._logs = {**self._logs, **dict(logs or {})}  # validation logs join here

    def on_train_end(self, logs=None):
        elapsed = time.perf_counter() - self._start
        self.summary = self.summary_line(self._done, {**self._logs, **dict(logs or {})}, elapsed)
        self._show(self.summary, final=True)
