"""Atomic file writes: a temporary file beside the target, then a rename.

A crash or a bad input never leaves a partial output, and never half-overwrites one.
Temporary names are hidden and end in ``.part``, so a crash that leaves one never leaves
something that looks like a scan (``.k_bml.nii.gz.x1y2.part``, not ``....nii.gz``).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from bmltrt.errors import BmlError


def _default_mode() -> int:
    """What a plain open() would give (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call write(tmp_path), then move tmp_path onto `path`.

    `suffix` goes before the final ``.part`` (for writers that look at the extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_leftovers(path: str | os.PathLike) -> None:
    """Remove the temporaries atomic_write(path) left when its process was killed outright
    (SIGKILL, power): hidden, but never to be finished."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part") if path.parent.is_dir() else ():
        stale.unlink(missing_ok=True)


def check_marked_block(path: str | os.PathLike, begin: str, end: str, what: str) -> tuple[str, "re.Pattern"]:
    """The text of a file that holds the `begin`/`end` markers (else one clear line): checked
    before a command writes anything else, so a bad --readme leaves no outputs behind."""
    path = Path(path)
    if not path.is_file():
        raise BmlError(f"no such file to paste the {what} into", path, "give an existing README.md")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BmlError(f"cannot read the file ({type(exc).__name__})", path, "give a readable text README") from None
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise BmlError(f"the file has no {what} markers", path,
                       f"put the two lines {begin!r} and {end!r} where the {what} go")
    return text, pat


def replace_marked_block(path: str | os.PathLike, begin: str, end: str, body: str, what: str) -> Path:
    """Put `body` between the lines `begin` and `end` of a text file (a README's generated
    section), atomically; no markers: one clear line naming `what` they are for."""
    path = Path(path)
    text, pat = check_marked_block(path, begin, end, what)
    new = pat.sub(lambda _: f"{begin}\n{body}{end}", text, count=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(new))
