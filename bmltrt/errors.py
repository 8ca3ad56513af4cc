"""One exception type for everything the user can fix.

The CLI prints ``str(err)`` as a single line and exits 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class BmlError(Exception):
    """A user error: bad input file, bad option, missing model.

    ``what`` says what is wrong, ``path`` which file, ``hint`` what to do.
    """

    def __init__(self, what: str, path: object = None, hint: str | None = None):
        self.what = what
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.what]
        if self.path:
            parts.append(f"file: {self.path}")
        if self.hint:
            parts.append(self.hint)
        # One line, whatever the inner messages held; a file name's control characters (an
        # escape sequence would recolour the terminal) are shown, not sent.
        return " | ".join(printable(p).strip() for p in parts)


def printable(text: str) -> str:
    """Control characters (ESC, CR, BEL, ...) as \\x escapes; tabs as spaces."""
    text = text.replace("\t", " ")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the output set in progress is cleaned up."""


# SIGTERMs received by this command. The exception raised by the handler can be lost: when
# the handler runs inside C code that clears Python errors (seen in a cold `export`, during
# a lazy import), the command ran on to the end and committed. Every commit checks this
# first (io.outputs.signals_held), so a termination is never lost at the point that matters.
TERMINATION_REQUESTS: list[int] = []


def interrupt_line(term: bool, hint: str = "run the command again") -> str:
    """The one line for Ctrl-C (term False) or SIGTERM that stopped a command, without "error: "."""
    return f"{'SIGTERM' if term else 'interrupt'}: stopped before the end | {hint}"


def raise_interrupted(signum, frame):
    TERMINATION_REQUESTS.append(signum)
    raise Interrupted(signum)


def stop_if_terminated() -> None:
    """Raise Interrupted if a SIGTERM arrived whose exception went missing."""
    if TERMINATION_REQUESTS:
        raise Interrupted(TERMINATION_REQUESTS[-1])


def with_article(word) -> str:
    """'a segmenter', 'an inpainter': for lines that name a kind of checkpoint."""
    return ("an " if str(word)[:1].lower() in "aeiou" else "a ") + str(word)
