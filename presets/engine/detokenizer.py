"""Incremental detokenization for streams: each new token costs the decoding of a short window, not of the
whole output, and no text is given out while its last character is still incomplete UTF-8.

The window starts a few tokens back (`prefix`), so tokenizers that treat the first token of a decode
specially (SentencePiece drops its leading space) treat it alike in both decodes; the new text is what the
window with the new tokens adds to the window without them. Byte-level BPE may split one character over
several tokens: while the window's text ends in U+FFFD the tokens wait for the rest of the character.
"""


class Detokenizer:
    def __init__(self, decode):
        self.decode = decode  # (ids) -> text
        self.ids: list[int] = []
        self.prefix = 0  # where the window starts
        self.read = 0  # tokens up to here are in self.text
        self.text = ""

    def add(self, ids: list[int]) -> str:
        """Append new token ids; the text they complete (may be "" while a character is incomplete)."""
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new

    def update(self, all_ids: list[int]) -> str:
        """The text so far of a sequence whose whole output is `all_ids` (a longer list than last time)."""
        if len(all_ids) > len(self.ids):
            self.add(all_ids[len(self.ids) :])
        return self.text
