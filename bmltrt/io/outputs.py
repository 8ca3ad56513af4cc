"""The one place that names a scan's outputs and writes them as a whole set.

Per scan ``<stem>_bml.nii.gz``, ``<stem>_femur.nii.gz``, ``<stem>_overlay.png`` and
``<stem>_report.json``. A set is written all-or-nothing:

1. ``.bmltrt-partial-<stem>/`` is made beside the outputs with ``mkdir`` (atomic): it is
   the lock that keeps two runs off one scan's outputs, and the staging folder. Files in
   it are named ``<kind>.part`` so nothing there ever looks like a scan.
2. Every file is written there; nothing in the output folder has changed yet.
3. Commit, with SIGINT/SIGTERM held back: the old report (the completion mark) is
   removed first, the new files are moved in by rename, the report last.

So a report means the set is whole. Files of ours without a report are an interrupted
set, which a rerun completes without ``--overwrite``; a complete set, or any file that
is not ours, is replaced only with ``--overwrite``, and an input of the run never.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from bmltrt.errors import BmlError, stop_if_terminated

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# kind -> file-name ending; the report is the completion mark and is moved in last.
OUTPUT_ENDINGS = {"bml": "_bml.nii.gz", "femur": "_femur.nii.gz", "overlay": "_overlay.png",
                  "report": "_report.json"}
COMMIT_ORDER = ("bml", "femur", "overlay", "report")
MASK_DESCRIP = b"bmltrt mask"  # written into our masks' header: how we know our own files
SYNTH_DESCRIP = b"bmltrt synth"  # written into generated scans and their label volumes
PARTIAL_PREFIX = ".bmltrt-partial-"
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
PART_SUFFIX = ".part"
STALE_AFTER_S = 60.0  # a staging folder without a pid file older than this is left from a crash
# One scan is written within minutes; a lock older than this is left from a killed run even
# when its pid now belongs to another live process (pid reuse, pid 1 in a container).
LOCK_MAX_AGE_S = 6 * 3600.0


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``k.nii.gz``, ``K.NII.GZ``, ``a.b c.nii`` -> ``k``, ``K``, ``a.b c`` (other names unchanged)."""
    low = name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def visible_stem(stem: str) -> str:
    """The stem outputs are named by, never hidden: ``..nii.gz`` would give ``._bml.nii.gz``."""
    s = stem.lstrip(".")
    if ("." + s).lower() in NIFTI_SUFFIXES:  # a file named just ".nii.gz"
        s = ""
    return s or "scan"


def nifti_stem(name: str) -> str:
    """The outputs' stem of a NIfTI file name: ``K.nii.gz`` -> ``K``, ``..nii.gz`` -> ``scan``."""
    return visible_stem(strip_nifti_suffix(name))


def check_folder_path(folder: Path, what: str, hint: str) -> None:
    """A folder this run will make or write into: refused now (not after minutes of work)
    when it, or the first of its parents that exists, is not a folder."""
    folder = Path(folder)
    there = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if there is not None and not there.is_dir():
        raise BmlError(f"{what} is a file, not a folder" if there == folder else f"{what} lies under a file ({there})",
                       folder, hint)


def refuse_earlier_results(out_dir: Path, patterns, overwrite: bool) -> None:
    """Results of an earlier run (or a user's files of the same names: glob patterns) are
    replaced only on --overwrite: a rerun into the same -o must not silently destroy them."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.is_dir():
        return
    there = sorted({p.name for pat in patterns for p in out_dir.glob(pat)})
    if there:
        raise BmlError(f"earlier results are in the output folder ({', '.join(there)})", out_dir,
                       "add --overwrite to replace them, or choose another -o")


def remove_stale_results(out_dir: Path, names: str, written, keep=()) -> list[str]:
    """After a run that replaced earlier results (--overwrite): the files whose whole name
    matches the regular expression `names` (``table1_\\d+\\.csv``: only names we write, never
    ``table1_backup.csv``) that this run did not write and that are not in `keep` (its
    inputs) are removed, so the folder holds one run's results, not a mix. Returns them."""
    pattern = re.compile(names)
    spared = {Path(w).name for w in written}
    kept = {Path(k).resolve() for k in keep}
    stale = sorted(p for p in Path(out_dir).iterdir() if pattern.fullmatch(p.name) and p.name not in spared
                   and (p.is_file() or p.is_symlink()) and p.resolve() not in kept)
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def is_output_name(name: str) -> bool:
    """A name of the kind we write (any case), e.g. ``k_bml.nii.gz``, ``K_REPORT.JSON``."""
    low = name.lower()
    return any(low.endswith(e) for e in OUTPUT_ENDINGS.values()) or low.startswith(PARTIAL_PREFIX)


def is_our_mask(path: Path, mark: bytes = MASK_DESCRIP) -> bool:
    """True for a NIfTI file whose header says bmltrt wrote it (reads the header only);
    `mark`: SYNTH_DESCRIP for a generated scan or label volume."""
    try:
        import nibabel as nib

        img = nib.load(str(path))
        return bytes(img.header["descrip"]).startswith(mark)
    except Exception:
        return False


def _is_ours(path: Path, kind: str) -> bool:
    if kind in ("bml", "femur"):
        return is_our_mask(path)
    if kind == "report":
        try:
            return "bmltrt_version" in json.loads(path.read_text())
        except Exception:
            return False
    if kind == "overlay":
        try:
            from PIL import Image

            with Image.open(path) as im:
                return im.info.get("Software", "").startswith("bmltrt")
        except Exception:
            return False
    return False


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# What the user can do about an OSError while writing outputs (--out) ...
_OUTPUT_HINTS = {
    errno.ENOSPC: "free some space or choose another --out folder",
    errno.EDQUOT: "free some space or choose another --out folder",
    errno.EACCES: "check the folder's permissions or choose another --out folder",
    errno.EPERM: "check the folder's permissions or choose another --out folder",
    errno.EROFS: "the file system is read-only: choose another --out folder",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another --out folder",
    errno.EEXIST: "a file is in the way: choose another --out folder",
    errno.ENAMETOOLONG: "the file name is too long: rename the scan or use a shorter --out path",
}
# ... and where it may as well be an input or the models folder.
_ANY_PATH_HINTS = {
    errno.EACCES: "check the permissions of that file and its folder",
    errno.EPERM: "check the permissions of that file and its folder",
    errno.ENOSPC: "free some space or choose another --out folder",
}


def os_error(exc: OSError, path, doing: str, output: bool = True) -> BmlError:
    """A user-facing line for an OSError: what failed, where, what to do. `output`: False
    where the failure may be on an input or the models folder too (the hint names no --out)."""
    hints, fallback = ((_OUTPUT_HINTS, "check the output folder") if output
                       else (_ANY_PATH_HINTS, "check the paths of the inputs, the models and --out"))
    why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return BmlError(f"cannot {doing} ({why})", getattr(exc, "filename", None) or path,
                    hints.get(exc.errno, fallback))


@dataclass
class OutputSet:
    """The four output files of one scan in one folder."""

    out_dir: Path
    stem: str

    @property
    def paths(self) -> dict[str, Path]:
        return {k: self.out_dir / f"{self.stem}{e}" for k, e in OUTPUT_ENDINGS.items()}

    @property
    def staging(self) -> Path:
        # A stem whose outputs still fit in a file name (255 bytes) may make a staging name too
        # long: then a hashed one (the same for every run of that scan: it is the lock).
        name = f"{PARTIAL_PREFIX}{self.stem}"
        if len(name.encode()) > NAME_MAX:
            name = f"{PARTIAL_PREFIX}{hashlib.sha1(self.stem.encode()).hexdigest()[:16]}"
        return self.out_dir / name

    def existing(self) -> dict[str, Path]:
        """Existing files that this set would replace, matched without regard to case
        (so ``K_BML.NII.GZ`` counts on case-insensitive file systems and on this one)."""
        if not self.out_dir.is_dir():
            return {}
        wanted = {p.name.lower(): k for k, p in self.paths.items()}
        found = {}
        try:
            entries = list(os.scandir(self.out_dir))
        except OSError:
            return {}
        for e in entries:
            k = wanted.get(e.name.lower())
            if k is not None:
                found[k] = Path(e.path)
        return found

    def is_complete(self) -> bool:
        have = self.existing()
        return set(have) == set(OUTPUT_ENDINGS) and all(_is_ours(p, k) for k, p in have.items())

    def foreign(self) -> list[Path]:
        """Existing files at this set's names that bmltrt did not write."""
        return [p for k, p in self.existing().items() if not _is_ours(p, k)]

    def check_writable(self, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
        """The overwrite guard over the whole set, and another run's live lock on it (found
        before the work, not after). Raises BmlError; writes nothing."""
        if self.staging.is_dir():
            pid, stale = _lock_state(self.staging)
            if not stale:
                raise _locked(pid, self.staging)
        have = self.existing()
        for p in have.values():
            if p.is_dir() or (p.exists() and not p.is_file()):  # no rename can replace it: refuse before writing
                raise BmlError("a folder or other non-file is where an output goes", p,
                               "move it away or choose another --out folder")
        for k, p in self.paths.items():
            for src in inputs:
                if same_file(src, p) or (k in have and same_file(src, have[k])):
                    raise BmlError("an output would overwrite an input of this run", p,
                                   "choose another --out folder")
        if not have or overwrite:
            return
        foreign = self.foreign()
        if foreign:
            raise BmlError("a file that bmltrt did not write is where an output goes", foreign[0],
                           "move it away, choose another --out folder, or pass --overwrite")
        if "report" in have:
            raise BmlError("outputs exist already", have["report"],
                           "pass --overwrite or choose another --out folder")
        # ours without a report: an interrupted set, which this run completes


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_state(stage: Path) -> tuple[int, bool]:
    """(the pid in a staging folder, whether the folder is stale: left by a run that is gone)."""
    try:
        pid = int((stage / "pid").read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    try:
        age = time.time() - stage.stat().st_mtime
    except OSError:
        age = None
    young = age is not None and age < STALE_AFTER_S
    ancient = age is not None and age > LOCK_MAX_AGE_S  # untouched for hours: stale even if its pid was reused
    # No pid yet and just made: another run is between its mkdir and its pid file.
    return pid, (pid == os.getpid()) or ancient or (not _pid_alive(pid) if pid else not young)


def _locked(pid: int, stage: Path) -> BmlError:
    return BmlError(f"another bmltrt run (pid {pid}) is writing the outputs of this scan", stage,
                    "wait for it, or remove this folder if no bmltrt run is going on")


@contextmanager
def locked_staging(outs: OutputSet):
    """Make the staging folder (the per-scan lock); remove it afterwards, whatever happens."""
    try:
        outs.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, outs.out_dir, "make the output folder") from None
    stage = outs.staging
    for attempt in (0, 1):
        try:
            os.mkdir(stage)
            break
        except FileExistsError:
            pid, stale = _lock_state(stage)
            if attempt == 0 and stale:
                shutil.rmtree(stage, ignore_errors=True)  # left by a killed run: take it over
                continue
            raise _locked(pid, stage) from None
        except OSError as exc:
            raise os_error(exc, outs.out_dir, "write into the output folder") from None
    try:
        try:
            (stage / "pid").write_text(str(os.getpid()))
        except OSError as exc:
            raise os_error(exc, stage, "write into the output folder") from None
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM back during the commit's renames (delivered right after). A
    SIGTERM that came earlier but whose exception was lost stops the commit before it starts."""
    stop_if_terminated()
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stage_place(out_dir: Path, tag: str) -> Path:
    """Where folder_beside stages: beside `out_dir` (so nothing shows in it until move_in),
    or inside it, hidden, where beside would be another filesystem (a mount point, a volume:
    a rename across filesystems fails, EXDEV) or cannot be written."""
    beside = out_dir.parent / f".{out_dir.name}.{tag}-partial-{os.getpid()}"
    if not out_dir.is_dir():
        return beside
    try:
        same_fs = os.stat(out_dir).st_dev == os.stat(out_dir.parent).st_dev
    except OSError:
        same_fs = False
    if same_fs and os.access(out_dir.parent, os.W_OK):
        return beside
    return out_dir / f".{tag}-partial-{os.getpid()}"


def _drop_abandoned_stages(folder: Path, pattern: str) -> None:
    """Staging folders of runs that were killed outright (SIGKILL, power loss): their name
    ends in the PID of a process that no longer exists."""
    for old in folder.glob(pattern):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive (another user's), or not a PID


@contextmanager
def folder_beside(out_dir: Path, tag: str):
    """A hidden folder beside `out_dir` (inside it where beside is another filesystem) where a
    result is made whole before move_in puts it in place (`export`, `synth`, `demo`): an
    interrupted or failed run leaves `out_dir` as it was. Removed on the way out, whatever
    happens."""
    out_dir = Path(out_dir)
    stage = _stage_place(out_dir, tag)
    _drop_abandoned_stages(stage.parent, stage.name.rsplit("-", 1)[0] + "-*")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def move_in(stage: Path, out_dir: Path, last: str, drop_first: Iterable[str] = ()) -> None:
    """Move every entry of `stage` into `out_dir`, replacing entries of the same name (files
    and folders), `last` last and the `drop_first` names removed before anything moves (so
    that nothing is taken for finished in between). Signals wait for the renames."""
    out_dir = Path(out_dir)
    with signals_held():  # first: a termination whose exception was lost stops us before out_dir is made
        out_dir.mkdir(parents=True, exist_ok=True)
        if os.stat(stage).st_dev != os.stat(out_dir).st_dev:  # before anything old is removed
            raise BmlError("the output folder is on another filesystem than the folder this run staged in",
                           out_dir, "give a folder on one filesystem with its parent, or a new folder")
        for name in drop_first:
            (out_dir / name).unlink(missing_ok=True)
        for new in sorted(Path(stage).iterdir(), key=lambda f: f.name == last):
            old = out_dir / new.name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif new.is_dir() and (old.exists() or old.is_symlink()):
                old.unlink()
            os.replace(new, old)


def write_output_set(outs: OutputSet, writers: dict[str, Callable[[Path], object]], overwrite: bool = False,
                     inputs: Iterable[Path] = ()) -> dict[str, Path]:
    """Write the whole set (writers[kind](path) writes one file), all-or-nothing."""
    inputs = list(inputs)
    outs.check_writable(overwrite, inputs)
    with locked_staging(outs) as stage:
        # Re-check under the lock: another run may have finished this set meanwhile.
        outs.check_writable(overwrite, inputs)
        staged = {}
        for kind in COMMIT_ORDER:
            tmp = stage / f"{kind}{PART_SUFFIX}"
            try:
                writers[kind](tmp)
            except OSError as exc:
                raise os_error(exc, outs.paths[kind], "write the outputs") from None
            staged[kind] = tmp
        final = outs.paths
        with signals_held():
            try:
                old = outs.existing()
                if "report" in old:
                    os.unlink(old["report"])  # the set is incomplete from here until the new report
                for kind in COMMIT_ORDER:
                    if kind in old and old[kind].name != final[kind].name:
                        old[kind].unlink(missing_ok=True)  # a differently cased old file (the report: gone already)
                    os.replace(staged[kind], final[kind])
            except OSError as exc:
                raise os_error(exc, outs.out_dir, "move the outputs into place") from None
    return final
