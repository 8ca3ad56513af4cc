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
        # One line, whatever the inner messages held.
        return " | ".join(p.replace("\n", " ").strip() for p in parts)
