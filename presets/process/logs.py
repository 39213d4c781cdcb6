"""The servers' log: one line per record, so what a client sent can never forge a line of its own.

A request's path, a header or an exception's message may hold CR, LF, ESC or Unicode line separators:
written raw, `GET /x%0a2026-... INFO presets.requests: POST /shutdown 200` would add a line that reads
as the server's own. Every record is written on one line with such characters escaped (`\\n`, `\\x1b`),
and a traceback's lines are indented, so a line that starts at its first column is always one the
server wrote.
"""

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0 and C1 controls, Unicode's line separators


def one_line(text: str) -> str:
    """`text` with control characters and line breaks written as Python escapes."""
    return _BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return "\n".join("  " + one_line(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + one_line(line) for line in stack_info.splitlines())


def setup(level: str | int = logging.INFO) -> None:
    """Log to stderr in the servers' format (call before the app is made: Quart adds no handler of its own then)."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
