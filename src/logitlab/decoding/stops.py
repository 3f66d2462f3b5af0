"""Stop strings matched on decoded text, across token boundaries.

A stop string can be split over several tokens ("\\n\\n" as "\\n" + "\\n", "END" as "E" + "ND"), so it is
searched for in the decoded text, not in token ids. While streaming, the last ``len(longest stop) - 1``
characters are held back: they might be the start of a stop string, and the stop string itself is never
part of the returned text.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def feed(self, new_text: str, check: bool = True) -> str:
        """Add decoded text; return what can now be emitted. After a match, ``stopped`` is True and the
        text ends just before the stop string. ``check=False`` (e.g. before min_tokens) only appends."""
        start = max(0, len(self.text) - self.holdback)
        self.text += new_text
        if check and self.stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = max(self.emitted, len(self.text) - self.holdback) if self.stops else len(self.text)
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def flush(self) -> str:
        """Emit everything held back (the sequence has ended for another reason)."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
