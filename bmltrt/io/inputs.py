"""What `bmltrt detect` was given -> the scans to run: NIfTI files and DICOM series.

Files, folders and globs, in order, without repeats. A folder gives its NIfTI files and
its DICOM series (not its subfolders). Never taken as scans: hidden files (names
starting with "."; our temporary files and macOS "._" files among them) and masks that
bmltrt wrote (told by their header, whatever their names) — these are skipped with a
note. Anything else that cannot be a scan becomes a one-line error for that item only.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bmltrt.errors import BmlError
from bmltrt.io.outputs import is_nifti_name, is_our_mask, nifti_stem, visible_stem


@dataclass
class ScanSource:
    """One scan to run: a NIfTI file, or one series (at one echo) of a DICOM folder."""

    path: Path
    series: object = None  # bmltrt.io.dicom.DicomSeries for DICOM

    @property
    def stem(self) -> str:
        return visible_stem(self.series.stem) if self.series is not None else nifti_stem(self.path.name)

    @property
    def label(self) -> str:
        return self.series.label if self.series is not None else str(self.path)

    @property
    def files(self) -> list[Path]:
        return list(self.series.files) if self.series is not None else [self.path]

    def load(self, force_orientation: bool = False):
        from bmltrt.io.nifti import load_scan, scan_from_image

        if self.series is None:  # the stem, not the file name, names the outputs (never hidden)
            return load_scan(self.path, force_orientation, stem=self.stem)
        from bmltrt.io.dicom import read_series

        scan = scan_from_image(read_series(self.series), self.path, force_orientation, stem=self.stem)
        s = self.series
        te = s.echo_times[s.echo - 1] if s.echo_times else None
        scan.source = {"dicom_series_uid": s.uid, "series_number": s.number, "series_description": s.description,
                       "echo": s.echo, "echoes": len(s.echo_times) or 1, "echo_time_ms": te, "files": len(s.files)}
        return scan


@dataclass
class Expanded:
    sources: list[ScanSource]
    problems: list[BmlError]  # items that gave no scan, each a one-line error
    notes: list[str]  # what was skipped, and why


def _mode(path: Path, follow: bool = True) -> int:
    """st_mode, or 0 where the path cannot be reached (Path.is_file and friends raise on a
    folder that cannot be searched, EACCES; the read that follows says why)."""
    try:
        return (os.stat if follow else os.lstat)(path).st_mode
    except (OSError, ValueError):
        return 0


def is_regular_file(path: Path) -> bool:
    return stat.S_ISREG(_mode(path))


def _is_dir(path: Path) -> bool:
    return stat.S_ISDIR(_mode(path))


def _is_link(path: Path) -> bool:
    return stat.S_ISLNK(_mode(path, follow=False))


def file_problem(path: Path) -> BmlError | None:
    """Why `path` cannot be opened as a scan file (missing, a broken or looping link, a
    folder, a pipe or a device), or None for a regular file."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return BmlError("a symbolic link that loops (it never reaches a file)", path, "fix or remove the link")
        if _is_link(path):
            return BmlError(f"a broken symbolic link (its target {os.readlink(path)} does not exist)", path,
                            "fix or remove the link")
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return BmlError("file not found", path, "check the path")
        return BmlError(f"cannot read this file ({os.strerror(exc.errno) if exc.errno else exc})", path,
                        "check the file's permissions (and its folder's)")
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return BmlError("not a file", path, "give a .nii or .nii.gz file")
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
    return BmlError(f"{kind}, not a regular file", path, "give the scan file itself")


def single_dicom_file_problem(path: Path) -> BmlError | None:
    """A lone DICOM file (not a NIfTI name) given where a scan goes: bmltrt reads series."""
    from bmltrt.io.dicom import is_dicom_file

    if is_regular_file(path) and not is_nifti_name(path.name) and is_dicom_file(path):
        return BmlError("a single DICOM file: bmltrt reads whole series", path,
                        f"give its folder: bmltrt detect {path.parent}")
    return None


def _folder(folder: Path, echo: int | None, out: Expanded) -> None:
    from bmltrt.io.dicom import dicom_files_in, find_series

    try:
        mode = {p: _mode(p) for p in sorted(folder.iterdir())}  # one stat per entry
    except OSError as exc:
        out.problems.append(BmlError(f"cannot list the folder ({os.strerror(exc.errno or 0)})", folder))
        return
    entries = [p for p, m in mode.items() if stat.S_ISREG(m)]
    # a NIfTI name that is no file (a broken or looping link, a pipe) is said, not skipped
    odd = [err for p, m in mode.items() if not p.name.startswith(".") and is_nifti_name(p.name)
           and not stat.S_ISREG(m) and not stat.S_ISDIR(m) and (err := file_problem(p)) is not None]
    out.problems += odd
    visible = [p for p in entries if not p.name.startswith(".")]
    nifti = [p for p in visible if is_nifti_name(p.name)]
    ours = [p for p in nifti if is_our_mask(p)]
    if ours:
        out.notes.append(f"skipped {len(ours)} mask(s) that bmltrt wrote in {folder}")
    out.sources += [ScanSource(p) for p in nifti if p not in ours]
    if dicom_files_in(folder):
        try:
            out.sources += [ScanSource(folder, s) for s in find_series(folder, echo, out.problems)]
        except BmlError as err:
            out.problems.append(err)
    elif not nifti and not odd:
        # A folder's hidden files are skipped (as ls skips them); a file given by name is read.
        hidden = [p.name for p in entries if p.name.startswith(".") and is_nifti_name(p.name)]
        skipped = f" (skipped hidden: {', '.join(hidden[:3])}{', ...' if len(hidden) > 3 else ''})" if hidden else ""
        out.problems.append(BmlError("no NIfTI files (.nii, .nii.gz) and no DICOM series in this folder" + skipped,
                                     folder, "give a hidden scan by its file name" if hidden else
                                     "give scan files, or a folder of them (subfolders are not searched)"))


def expand_inputs(items: list[str], echo: int | None = None) -> Expanded:
    out = Expanded([], [], [])
    for item in items:
        p = Path(item)
        if not item.strip():  # Path("") is the current folder: never what an empty argument meant
            out.problems.append(BmlError("an empty input path", repr(item), "give a NIfTI file, a folder or a glob"))
            continue
        if any(c in item for c in "*?[") and not _mode(p):
            hits = sorted(glob.glob(item))
            if not hits:
                out.problems.append(BmlError("no file matches this pattern", item, "check the path"))
            for h in hits:
                hp = Path(h)
                if _is_dir(hp):
                    _folder(hp, echo, out)
                elif not hp.name.startswith(".") or is_nifti_name(hp.name):
                    # glob matches a hidden file only where the pattern names one (".k*"): asked for
                    out.sources.append(ScanSource(hp))
        elif _is_dir(p):
            _folder(p, echo, out)
        elif (problem := single_dicom_file_problem(p)) is not None:  # before any model is loaded
            out.problems.append(problem)
        else:
            out.sources.append(ScanSource(p))  # a missing or bad file fails with its own line
    seen, unique = set(), []
    for s in out.sources:
        key = (str(s.path.resolve()) if _mode(s.path) else str(s.path),
               getattr(s.series, "uid", None), getattr(s.series, "echo", None))
        if key not in seen:
            seen.add(key)
            unique.append(s)
    out.sources = unique
    return out
