"""Stop strings and streamed text, one implementation for every engine's routes (OpenAI, llm-api)."""

from presets.engine.detokenizer import Detokenizer
from presets.errors import ApiError


def stop_window(stops) -> int:
    """Tokens whose text holds any stop string that the newest token completed: a character takes at most
    4 byte tokens, plus slack for the window's own first token, whose decoding may differ."""
    return 4 * max(len(s) for s in stops) + 8


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StreamedText:
    """What to send of one choice's text as its tokens come: whole characters only (incremental
    detokenization), cut at the first stop string, and the last len(longest stop) - 1 characters held back
    while a later token may still make them a stop string. The pieces join to the non-streamed text."""

    def __init__(self, decode, stops=()):
        self.decode = decode  # (ids) -> text
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.detokenizer = Detokenizer(decode)
        self.sent = ""
        self.stopped = False  # the final text ended at a stop string

    def update(self, ids: list[int], done: bool = False) -> str:
        """The text to send now for a choice whose output so far is `ids` ("" when nothing is settled); `done`:
        `ids` is the whole output, whose decoding settles the rest."""
        text, self.stopped = cut_at_stop(self.decode(ids) if done else self.detokenizer.update(ids), self.stops)
        if not done:
            text = text[: max(0, len(text) - self.hold)]
        if not text.startswith(self.sent):
            if done:  # never silently shorter than the non-streamed text
                raise ApiError(500, "streamed text diverged from the final text; retry without stream")
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


class TokenOffsets:
    """Where each token of a growing output ends in its text (incremental), so per-token data (log
    probabilities) goes out with the text that carries its token."""

    def __init__(self, decode):
        self.detokenizer = Detokenizer(decode)
        self.ends: list[int] = []  # text length once token i is in (a token that ends inside a character: 0 wide)
        self.given = 0  # tokens handed out so far

    def take(self, ids: list[int], length: int, final: bool = False) -> list[tuple[int, int]]:
        """(index, start offset) of the tokens not handed out yet that the first `length` characters carry:
        those ending within them; `final` (the whole answer is `length` long): those starting within them."""
        for token in ids[len(self.ends) :]:
            self.detokenizer.add([token])
            self.ends.append(len(self.detokenizer.text))
        out = []
        while self.given < len(self.ends):
            start = self.ends[self.given - 1] if self.given else 0
            if not (start < length if final else self.ends[self.given] <= length):
                break
            out.append((self.given, start))
            self.given += 1
        return out
