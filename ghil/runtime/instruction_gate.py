"""InstructionGate: what an instruction arriving on a topic must pass before it reaches the planner.

The ROS graph takes instructions from ``/ghil/instruction`` (``std_msgs/String``), i.e. from anyone on the network,
so every message is checked here (pure Python: the node stays a thin shell, and this is tested without rclpy):

* text: a ``str`` (or UTF-8 ``bytes``), not empty after stripping, at most ``max_chars`` (512) characters, no
  control characters other than whitespace and no undecodable bytes (binary garbage), whitespace runs collapsed;
* rate: a token bucket (``rate_per_s`` sustained, ``burst`` at once) so a flood of 1,000 messages per second cannot
  make the planner restart a thousand times; what exceeds it is rejected, counted, and the gate recovers by itself;
* repeats: the same instruction again while it is being executed is ignored (publishers with transient-local
  durability re-deliver the latched message to every late subscriber).

``check(message, now_s)`` returns an ``Accepted(text)`` or a ``Rejected(reason)``; it never raises for bad input,
so a caller can report the reason on ``/ghil/status`` and keep running.

Usage::

    gate = InstructionGate()
    verdict = gate.check(msg.data, time.monotonic())
    if verdict.ok:
        planner.start(verdict.text)
    else:
        publish_status({"state": "error", "reason": verdict.reason})
"""

from __future__ import annotations

import math
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = ["InstructionGate", "Verdict", "REPEAT"]

REPEAT = "already executing this instruction"  # the reason of a latched re-delivery (callers ignore it silently)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    text: str | None = None  # the cleaned instruction when accepted
    reason: str | None = None  # why it was rejected


class InstructionGate:
    """Validation, rate limiting and repeat suppression for incoming instructions (see the module docstring)."""

    def __init__(self, max_chars: int = 512, rate_per_s: float = 2.0, burst: int = 4):
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
        if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a finite number > 0, got {rate_per_s!r}")
        if not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        self.max_chars, self.rate_per_s, self.burst = max_chars, float(rate_per_s), burst
        self._tokens = float(burst)
        self._last_s: float | None = None
        self._active: str | None = None  # the instruction being executed (repeats of it are ignored)
        self._lock = threading.Lock()  # subscriber callbacks may run on several executor threads
        self.n_accepted = 0
        self.n_rejected = 0

    # -- the text -----------------------------------------------------------------------------------------------

    def clean(self, message: Any) -> tuple[str | None, str | None]:
        """(cleaned text, None) or (None, reason)."""
        if isinstance(message, (bytes, bytearray)):
            try:
                message = bytes(message).decode("utf-8")
            except UnicodeDecodeError:
                return None, "not UTF-8 text (binary data?)"
        if not isinstance(message, str):
            return None, f"not a string ({type(message).__name__})"
        if len(message) > self.max_chars:
            return None, f"too long: {len(message)} characters, at most {self.max_chars}"
        bad = [c for c in message if unicodedata.category(c).startswith("C") and not c.isspace()]
        if bad:
            return None, f"contains {len(bad)} control or unassigned characters (binary data?)"
        text = " ".join(message.split())
        if not text:
            return None, "empty instruction"
        return text, None

    # -- the gate -----------------------------------------------------------------------------------------------

    def check(self, message: Any, now_s: float) -> Verdict:
        text, reason = self.clean(message)
        with self._lock:
            if text is None:
                self.n_rejected += 1
                return Verdict(False, reason=reason)
            if text == self._active:
                return Verdict(False, reason=REPEAT)
            self._refill(float(now_s))
            if self._tokens < 1.0:
                self.n_rejected += 1
                return Verdict(False, reason=f"rate limited: more than {self.burst} instructions at once or "
                                             f"{self.rate_per_s:g} per second sustained")
            self._tokens -= 1.0
            self._active = text
            self.n_accepted += 1
            return Verdict(True, text=text)

    def done(self) -> None:
        """The active instruction ended (done, stopped or failed): the same text is accepted again."""
        with self._lock:
            self._active = None

    def _refill(self, now_s: float) -> None:
        if self._last_s is not None and now_s > self._last_s:
            self._tokens = min(float(self.burst), self._tokens + (now_s - self._last_s) * self.rate_per_s)
        if self._last_s is None or now_s > self._last_s:
            self._last_s = now_s
