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
        return " | ".join(_printable(p.replace("\n", " ")).strip() for p in parts)


def _printable(text: str) -> str:
    """Control characters (ESC, CR, BEL, ...) as \\x escapes; tabs as spaces."""
    text = text.replace("\t", " ")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
