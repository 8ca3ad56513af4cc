"""The `bmltrt` command. Thin: each command parses options and calls the library.

Every failure is one line on stderr: user errors (BmlError, bad options, OSError such as
a full disk or a read-only folder) exit 2; a bug exits 1 and names the log file that
holds its traceback. Heavy modules load inside commands.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from bmltrt.errors import TERMINATION_REQUESTS, BmlError, Interrupted, interrupt_line, printable
from bmltrt.errors import raise_interrupted as _raise_interrupted
from bmltrt.runtime.models import RESOLUTIONS, parse_resolutions

console = Console(stderr=True)
# nibabel logs header repairs ("pixdim[1,2,3] should be non-zero") to stderr: on the command line
# the one line of a refusal, or nothing, is what the user should see.
logging.getLogger("nibabel").setLevel(logging.ERROR)
out = Console()


def say(text: str) -> None:
    """One line to stdout as written: paths and labels may hold [brackets] that rich markup
    would eat ("my[models]" printed as "my"); not wrapped at 80 columns when piped."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def print_error(line: str) -> None:
    # escape: rich markup would eat "[train]" and other bracketed text of the message
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def print_warning(line: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def log_internal_error(exc: BaseException, where: str, log_dir: Path | None = None) -> Path | None:
    """Write the traceback to a log: appended to the output folder's bmltrt-errors.log, else
    (no output folder, or not writable) to a new private file in the temp folder. Links are
    not followed: in a shared /tmp a fixed name could be a link planted to another file."""
    import tempfile
    import time
    import traceback

    text = (f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} bmltrt {_version()} {where}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if log_dir:
        path = Path(log_dir) / "bmltrt-errors.log"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(text)
            return path
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="bmltrt-errors-", suffix=".log")  # O_EXCL, mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def _version() -> str:
    from bmltrt import __version__

    return __version__


def internal_error_line(exc: BaseException, where: str, log: Path | None) -> str:
    first = (str(exc).splitlines() or [""])[0][:200]
    return (f"internal error on {where} ({type(exc).__name__}: {first}) | full traceback in "
            f"{log or 'no log (nothing writable)'} | please report it")


def _flag_names(cmd) -> set[str]:
    """The on/off options of a command and of every command under it: they take no value,
    so "--mirror=" is not an empty path."""
    names = {n for p in getattr(cmd, "params", ()) if getattr(p, "is_flag", False)
             for n in list(p.opts) + list(p.secondary_opts)}
    for sub in getattr(cmd, "commands", {}).values():
        names |= _flag_names(sub)
    return names


def _empty_argument(args: list[str], flags=frozenset()) -> str | None:
    """No option or argument of ours takes an empty value, and typer would turn an empty path
    into Path(".") (-o "" wrote into the current folder; synth "" made a dataset there)."""
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if len(name) == 2 and name[0] == "-" and name[1] != "-" and eq:  # click reads -o=x as the path "=x"
            return f"{a!r}: a short option takes its value after a space ({name} {value or 'VALUE'}) | drop the ="
        hint = " | give it a value (for a file or folder, . is this folder), or leave the option out"
        if a.startswith("-") and eq and not value.strip():
            if name in flags:
                return f"{name} takes no value | write {name} alone"
            return f"{name} was given an empty value" + hint
        if not a.strip():
            prev = args[i - 1] if i else ""
            if prev.startswith("-") and "=" not in prev:
                return f"{prev} was given an empty value" + hint
            return "an empty path or value was given as an argument" + hint
    return None


_INTERRUPT_SAID: list = []  # non-empty once a command has said its interrupt line


class OneLineErrors(TyperGroup):
    """Bad options and bugs as one line too (click would print usage boxes and tracebacks)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        empty = _empty_argument(sys.argv[1:] if args is None else list(args), _flag_names(self))
        try:
            if empty:
                print_error(empty)
                code = 2
            else:
                _INTERRUPT_SAID.clear()
                TERMINATION_REQUESTS.clear()
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                code = rv if isinstance(rv, int) else 0
                if code == 130 and not _INTERRUPT_SAID:  # Ctrl-C or SIGTERM while typer parsed: it exits silently
                    term = bool(TERMINATION_REQUESTS)
                    print_error(interrupt_line(term))
                    code = 143 if term else 130
        except Exception as exc:  # click's UsageError/BadParameter/Abort, or a bug
            code = self._one_line(exc)
        if not standalone_mode:
            return code
        sys.exit(code)

    @staticmethod
    def _one_line(exc: Exception) -> int:
        name = type(exc).__name__
        if name == "NoArgsIsHelpError":
            exc.show()
            return 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            ctx = getattr(exc, "ctx", None)
            hint = f" | see `{ctx.command_path} --help`" if ctx is not None else ""
            print_error(exc.format_message().replace("\n", " ") + hint)
            return int(exc.exit_code)
        if name == "Abort":
            print_error("aborted")
            return 1
        log = log_internal_error(exc, "bmltrt " + " ".join(sys.argv[1:]))
        print_error(internal_error_line(exc, "this command", log))
        return 1


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Bone marrow lesion detection in the femur on knee MRI (UNet++ + LaMa, TensorRT-ready).")


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from bmltrt.io.outputs import os_error

        old_term = None
        TERMINATION_REQUESTS.clear()  # a new command (the CLI also runs in-process, in tests)
        try:  # SIGTERM like Ctrl-C: each command cleans up what it had begun, then one line
            old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            return fn(*args, **kwargs)
        except BmlError as err:
            print_error(err.line())
            raise typer.Exit(2)
        except KeyboardInterrupt as exc:
            term = isinstance(exc, Interrupted)
            hint = getattr(exc, "rerun_hint", "run the command again")
            print_error(interrupt_line(term, hint))
            _INTERRUPT_SAID.append(True)
            raise typer.Exit(143 if term else 130)
        except MemoryError:
            print_error("out of memory | use a smaller --batch-size, or a machine with more memory")
            raise typer.Exit(2)
        except OSError as exc:  # full disk, read-only folder, permissions: the user can fix these
            print_error(os_error(exc, getattr(exc, "filename", None), "read or write a file", output=False).line())
            raise typer.Exit(2)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
    return wrapper


def _positive(value: float, option: str) -> float:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise BmlError(f"{option} must be a positive number, not {value}")
    return value


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                    disable=not console.is_terminal
                    and os.environ.get("BMLTRT_PROGRESS", "").strip().lower() not in ("1", "true", "yes", "on"))


@app.command()
@user_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Output folder for the dataset."),
    cases: Optional[int] = typer.Option(None, "--cases", "-n", min=3, max=100_000,
                                        help="Number of subjects (at least 3; default 20), split 70/15/15 like "
                                             "the paper's 210/45/45."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the same seed gives byte-identical arrays."),
    from_labels: Optional[Path] = typer.Option(None, "--from-labels", help="Paint real label maps (1 femur, 7 femoral lesion, ...) instead."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", "-j", min=1, max=256, help="Parallel processes."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
):
    """Generate knee phantoms with exact femur and lesion masks (train/val/test splits)."""
    from bmltrt.io.outputs import folder_beside, move_in
    from bmltrt.synth.dataset import label_files, split_counts, synth_dataset, synth_from_labels

    if out_dir.exists() and not out_dir.is_dir():
        raise BmlError("the output path is a file, not a folder", out_dir, "choose a folder")
    if from_labels is not None and cases is not None:
        raise BmlError("--cases counts phantoms; --from-labels paints every label map of its folder once",
                       hint="leave --cases out (or give fewer label maps)")
    cases = 20 if cases is None else cases
    empty = not out_dir.exists() or not any(out_dir.iterdir())
    if not empty and not force:
        raise BmlError("output folder is not empty", out_dir, "choose a new folder or pass --force")
    if not empty:  # --force replaces the split folders whole: never with a user's files in them
        from bmltrt.io.outputs import SYNTH_DESCRIP, is_our_mask

        for split in ("train", "val", "test"):
            where = out_dir / split
            found = [where] if where.exists() and not where.is_dir() else \
                sorted(f for f in where.rglob("*") if not f.is_dir()) if where.is_dir() else []
            foreign = next((f for f in found if not is_our_mask(f, SYNTH_DESCRIP)), None)
            if foreign is not None:
                raise BmlError(f"--force would replace {split}/, which holds a file bmltrt did not write", foreign,
                               "move your files out of it, or choose a new folder")
    total = len(label_files(from_labels)) if from_labels else sum(split_counts(cases).values())
    # The dataset is made beside -o and moved in when whole: an interrupted or failed run
    # leaves the folder as it was (an earlier dataset too). The old dataset.json goes first
    # and the new one comes last, so a folder is never taken for a finished dataset between.
    with folder_beside(out_dir, "synth") as stage:
        with _progress() as prog:
            task = prog.add_task("synth", total=total, status="")
            step = lambda: prog.advance(task)  # noqa: E731
            if from_labels:
                man = synth_from_labels(stage, from_labels, seed, workers, step)
            else:
                man = synth_dataset(stage, cases, seed, workers, step)
        move_in(stage, out_dir, last="dataset.json", drop_first=["dataset.json"])
    n = {k: len(v) for k, v in man["splits"].items()}
    total = sum(n.values())
    say(f"wrote {total} case{'' if total == 1 else 's'} to {out_dir} (train {n['train']}, val {n['val']}, "
        f"test {n['test']})")


train_app = typer.Typer(no_args_is_help=True, help="Train the femur segmenter or the inpainter (needs bmltrt\\[train]).")
app.add_typer(train_app, name="train")


@dataclasses.dataclass
class _DataOptions:
    """Where training images come from (both trainers take the same options)."""

    data: Optional[Path]
    labels: Optional[Path]
    bank_cache: Optional[Path]
    phantoms: int
    phantom_fraction: Optional[float]
    val_data: Optional[Path]
    bank_seed: int = 0


def _check_dataset(path: Optional[Path], option: str, split: Optional[str] = None):
    """A `bmltrt synth` dataset; with `split`, one that has cases in that split."""
    if path is None:
        return
    if not (Path(path) / "dataset.json").exists():
        raise BmlError(f"{option}: not a bmltrt dataset (no dataset.json)", path, "make one with `bmltrt synth`")
    if split is not None:
        from bmltrt.synth.dataset import read_manifest

        man = read_manifest(Path(path))
        if not man["splits"].get(split):
            settings = man.get("settings")
            if isinstance(settings, dict) and settings.get("mode") == "labels":  # painted from label maps: val and test only, by design
                raise BmlError(f"{option}: this dataset was painted from label maps for evaluation (val and test "
                               f"splits, no {split} split)", path,
                               "train on phantoms (`bmltrt synth DIR`), or give label maps you may train on as --labels")
            raise BmlError(f"{option}: the dataset has no {split} cases", path,
                           "make one with more cases (`bmltrt synth DIR --cases 80`)")


def _train_common(kind, d: _DataOptions, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast="none", resolutions=None, more=None, trainer=None):
    """Shared by every `bmltrt train` command; `more` adds run options, `trainer(opts, progress)`
    runs the kinds defined elsewhere (the evaluation baselines)."""
    import json

    try:
        import torch
    except ImportError:
        raise BmlError("training needs torch", hint="pip install 'bmltrt[train]'") from None
    from bmltrt.training.loop import RunOptions

    _positive(lr, "--lr")
    _positive(time_limit, "--time-limit")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BmlError("the run folder (--out) is a file", out_dir, "choose a folder")
    if not resume and (Path(out_dir) / "checkpoint.pt").exists():  # a run's weights are never replaced unasked
        raise BmlError("the run folder already holds a checkpoint", out_dir,
                       "add --resume to go on from it, or choose another --out (or remove the folder)")
    _check_dataset(d.data, "--data", "train" if d.labels is None else None)  # with --labels it may only validate
    _check_dataset(d.val_data, "--val-data")
    if d.data is None and d.labels is None:
        raise BmlError("no training data", hint="give --labels DIR (label maps) and/or --data DIR (a `bmltrt synth` dataset)")
    if d.phantom_fraction is not None and not 0 <= d.phantom_fraction <= 1:
        raise BmlError(f"--phantom-fraction {d.phantom_fraction} is not in [0, 1]")
    if d.phantom_fraction is not None and (d.data is None or d.labels is None):
        print_warning(f"--phantom-fraction mixes --data phantoms into --labels scans: ignored, every batch is "
                      f"{'phantoms' if d.labels is None else 'label-driven scans'}")
    if autocast not in ("none", "bf16"):
        raise BmlError(f"--autocast {autocast!r} is not none or bf16")
    if autocast == "bf16" and device == "cpu":
        from bmltrt.training.loop import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            print_warning("--autocast bf16: this CPU has no native bfloat16 (AVX512-BF16), so torch emulates "
                          "it and training is several times slower; use --autocast none")
    extra: dict = {"autocast": autocast, **(more or {})}
    if extra.get("init") is not None and not Path(extra["init"]).is_file():  # before minutes of bank building
        raise BmlError("--init is a folder, not a checkpoint or graph" if Path(extra["init"]).is_dir()
                       else "no such checkpoint or graph (--init)", extra["init"],
                       "give a run's checkpoint.pt or best.pt, or a float32 .onnx of a models folder")
    cfg = _model_config(kind, config) if trainer is None else None
    if d.labels is not None:
        from bmltrt.synth.dataset import label_files
        from bmltrt.training.data import bank_paths

        label_files(d.labels)  # one clear line if the folder holds no label maps
        cache = d.bank_cache or Path(out_dir).parent / "anatomy_bank"
        with _progress() as prog:
            task = prog.add_task("anatomy bank", total=None, status=str(cache))
            extra["bank"] = bank_paths(d.labels, cache, phantoms=d.phantoms, seed=d.bank_seed,
                                       progress=lambda: prog.advance(task))
    if d.phantom_fraction is not None:
        extra["phantom_fraction"] = d.phantom_fraction
    if d.val_data is not None:
        extra["val_data"] = d.val_data
    opts = RunOptions(data=d.data, out=Path(out_dir), steps=steps, batch_size=batch_size, lr=lr,
                      device=device, seed=seed, resume=resume, val_every=val_every,
                      ckpt_every=max(1, min(100, val_every)), limit_cases=limit_cases,
                      time_limit_min=time_limit, extra=extra)
    if device in ("cuda", "gpu"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with _progress() as prog:
        task = prog.add_task(f"train {kind}", total=steps, status="")

        def progress(done, total, logs):
            prog.update(task, completed=done,
                        status="  ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float)))

        try:
            if trainer is not None:
                res = trainer(opts, progress)
            elif kind == "segmenter":
                from bmltrt.training.segmenter import train_segmenter

                res = train_segmenter(opts, cfg, progress)
            else:
                from bmltrt.training.inpainter import train_inpainter

                res = train_inpainter(opts, cfg, resolutions, progress)
        except KeyboardInterrupt as exc:  # the checkpoint is kept: a plain rerun would be refused
            exc.rerun_hint = ("add --resume to the same command to go on from the last checkpoint"
                              if (Path(out_dir) / "checkpoint.pt").exists() else
                              "run the same command again (no checkpoint was saved yet)")
            raise
    say(f"{kind}: step {res['steps']} of {steps} in {res['seconds']:.0f} s; {json.dumps(res['metrics'])}; "
        f"checkpoint {Path(out_dir) / 'checkpoint.pt'}")
    if kind in ("segmenter", "inpainter") and d.labels is None and not (Path(out_dir) / "best.pt").exists():
        console.print("note: no best.pt: the best step is chosen on generated validation scans, which a run "
                      "without --labels does not have; export checkpoint.pt", highlight=False, markup=False)


def _read_json(path):
    import json

    p = Path(path)
    if not p.is_file():
        raise BmlError(f"unknown config {path!r}: not a preset name nor a JSON file", p)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BmlError(f"the config is not readable JSON ({type(exc).__name__})", p, "fix the file") from None
    if not isinstance(doc, dict):
        raise BmlError(f"the config is a JSON {type(doc).__name__}, not an object of settings", p,
                       'write {"name": value, ...}') from None
    return doc


def _config_value_problem(key: str, value, default) -> str | None:
    """What is wrong with one network setting from a JSON file, judged by its default's type
    (and, for the fractions and sizes that any type would pass, by range); None if nothing."""
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if whole(value) and value > 0 else "must be a whole number above 0"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        if key == "overlap" and not 0 <= value < 1:
            return "must be a fraction from 0 to below 1"
        return None if value > 0 or key == "overlap" else "must be above 0"
    if isinstance(default, tuple):
        if not isinstance(value, list) or len(value) != len(default) or not all(whole(x) and x > 0 for x in value):
            return f"must be a list of {len(default)} whole numbers above 0"
    return None


def _model_config(kind: str, config: str):
    """The network settings of `--config`: a preset name or a JSON file, checked by building
    the network once (a bad width fails here, not after minutes of anatomy bank)."""
    if kind == "segmenter":
        from bmltrt.models.unetpp import SEGMENTER_PRESETS as presets, SegmenterConfig as cls, build_segmenter as build
    else:
        from bmltrt.models.lama import INPAINTER_PRESETS as presets, InpainterConfig as cls, LamaGenerator

        def build(c):
            return LamaGenerator(c, fft_impl="torch")
    if config in presets:
        return presets[config]
    doc = _read_json(config)
    unknown = sorted(set(doc) - set(cls.__dataclass_fields__))
    if unknown:
        raise BmlError(f"unknown {kind} setting(s) {', '.join(unknown)} in the config", config,
                       f"use {', '.join(cls.__dataclass_fields__)}")
    for k, v in doc.items():
        problem = _config_value_problem(k, v, getattr(cls(), k))
        if problem:
            raise BmlError(f"{kind} setting {k} = {v!r}: {problem}", config,
                           "check its values against a preset's (bmltrt/models)")
    try:
        cfg = cls.from_dict(doc)
        net = build(cfg)
        if kind == "segmenter":  # and once through it: a patch too small for its depth fails here
            import torch

            with torch.no_grad():
                net.eval()(torch.zeros(1, 1, *cfg.patch))
    except Exception as exc:  # noqa: BLE001 - any bad value: one line
        raise BmlError(f"the {kind} config does not build a network ({type(exc).__name__}: {exc})", config,
                       "check its values against a preset's (bmltrt/models)") from None
    return cfg


_DATA = typer.Option(None, "--data", help="Phantom dataset folder made by `bmltrt synth`.")
_LABELS = typer.Option(None, "--labels", help="Folder of knee label maps (1 femur, 2 femoral cartilage, 3 tibia, ...) "
                       "to paint SynthSeg-style, completed with phantom anatomies.")
_BANK = typer.Option(None, "--bank-cache", help="Where built anatomy variants are cached (default: beside --out).")
_PHANTOMS = typer.Option(12, "--phantoms", min=0, max=1000, help="Phantom anatomies added to the label maps' bank.")
_BANKSEED = typer.Option(0, "--bank-seed", min=0, help="Seed of the anatomy bank's variants: the bank is built "
                         "once per seed (minutes) and reused, whatever --seed the run has.")
_PFRAC = typer.Option(None, "--phantom-fraction", help="Share of each batch from the --data phantoms (default: 0 "
                      "with --labels, else 1).")
_VALDATA = typer.Option(None, "--val-data", help="Dataset whose val split is scored at each validation "
                        "(default: --data).")
_OUT = typer.Option(..., "--out", help="Run folder: checkpoint.pt, history.json.")
_AMP = typer.Option("none", "--autocast", help="none, or bf16: bfloat16 autocast (about 2x faster on a CPU "
                    "with AVX512-BF16 or a recent GPU; several times slower on a CPU without).")
_STEPS = typer.Option(1000, "--steps", min=1)
_BS = typer.Option(4, "--batch-size", min=1, max=1024)
_DEV = typer.Option("cpu", "--device", help="cpu or cuda.")
_SEED = typer.Option(0, "--seed", min=0)
_RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.")
_VAL = typer.Option(200, "--val-every", min=1, help="Validate (and checkpoint) every N steps.")
_LIMIT = typer.Option(None, "--limit-cases", min=1, help="Use only the first N cases of each split.")
_TIME = typer.Option(None, "--time-limit", min=0.0, help="Stop after this many minutes (checkpoint saved; steps reached recorded).")
_WORKERS = typer.Option(0, "--data-workers", min=0, max=64, help="Processes that make the label-driven scans "
                        "while the network trains (0: in the training process). On a GPU the generator is the "
                        "bottleneck: give it the cores; a run sees the same scans with any number above 0.")
_FRESH = typer.Option(None, "--fresh-per-step", min=1, max=256, help="Generated scans replaced in the sample pool "
                      "per step (default 1 for the segmenter, 2 per resolution for the inpainter); more with "
                      "--data-workers on a fast device, so that each scan serves fewer steps.")


def _share(default: float, flag: str, help: str):
    """A generator option that is a share of scans, in [0, 1]."""
    return typer.Option(default, flag, min=0.0, max=1.0, help=help)


def _loss_weight(flag: str, help: str):
    """An extra loss weight of `train segmenter`, in [0, 100], off by default."""
    return typer.Option(0.0, flag, min=0.0, max=100.0, help=help)


def _sample_options(labels, data_workers: int, fresh_per_step) -> dict:
    """Run options of the label-driven sample pool; both apply to --labels scans only."""
    if labels is None:
        for flag, given in (("--data-workers", data_workers), ("--fresh-per-step", fresh_per_step)):
            if given:
                print_warning(f"{flag} applies to label-driven scans (--labels): ignored")
        return {}
    cores = os.cpu_count() or 1
    if data_workers > cores:
        print_warning(f"--data-workers {data_workers} is more than this machine's {cores} cores: they will share them")
    return {"data_workers": data_workers, **({"refresh": fresh_per_step} if fresh_per_step else {})}


@train_app.command("segmenter")
@user_errors
def train_segmenter_cmd(data: Optional[Path] = _DATA, labels: Optional[Path] = _LABELS, out_dir: Path = _OUT,
                        bank_cache: Optional[Path] = _BANK, phantoms: int = _PHANTOMS, bank_seed: int = _BANKSEED,
                        phantom_fraction: Optional[float] = _PFRAC, val_data: Optional[Path] = _VALDATA,
                        config: str = typer.Option("cpu", "--config", help="Preset (cpu, cpu-fine, cpu-1mm, paper) or a JSON file."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(2e-3, "--lr", min=0.0),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME,
                        autocast: str = _AMP,
                        init: Optional[Path] = typer.Option(None, "--init", help="Start from this segmenter "
                                                            "checkpoint's weights (fine-tuning)."),
                        lesion_p: float = _share(0.5, "--lesion-p", help="Share of generated scans with "
                                                 "oedema-like lesions in the femur."),
                        max_lesions: int = typer.Option(3, "--max-lesions", min=1, max=20),
                        lesion_surface_p: float = _share(0.0, "--lesion-surface-p", help="Share of those lesions "
                                                         "that are small (1.5-6 mm) and touch the bone surface "
                                                         "under the cartilage."),
                        lesion_breach_p: float = _share(0.0, "--lesion-breach-p", help="Share of those surface "
                                                        "lesions that replace the cortex under them too (the "
                                                        "oedema then touches the cartilage)."),
                        lesion_weight: float = _loss_weight("--lesion-weight", help="Extra cross-entropy weight "
                                                            "on the generated lesions' voxels (they are femur: "
                                                            "a lesion carved out of the mask is never found)."),
                        shell_weight: float = _loss_weight("--shell-weight", help="Extra cross-entropy weight on "
                                                           "the ring just outside the true femur (balances "
                                                           "--lesion-weight, which alone grows the femur)."),
                        consistency_weight: float = _loss_weight("--consistency-weight", help="Weight of a loss "
                                                                 "that pulls together the femur of each generated "
                                                                 "scan drawn in two contrasts (the echoes of one "
                                                                 "knee must agree); pairs double each step's "
                                                                 "generated crops."),
                        anchor_weight: float = _loss_weight("--anchor-weight", help="Weight of a loss that keeps "
                                                            "the femur probability near that of the --init "
                                                            "network (a frozen copy), so that a fine-tune keeps "
                                                            "what it did well."),
                        anchor_scope: str = typer.Option("all", "--anchor-scope", help="Where --anchor-weight "
                                                         "holds: all (every femur-ish voxel) or lesions (within "
                                                         "1 slice and 3 pixels of a generated lesion, so the rest "
                                                         "of the border may move)."),
                        dark_muscle_p: float = _share(0.3, "--dark-muscle-p", help="Share of fat-suppressed "
                                                      "generated scans whose muscle is as dark as the marrow "
                                                      "(0.8-1.6x), as on a DESS echo 2."),
                        runtime_smoothing_p: float = _share(0.0, "--runtime-smoothing-p", help="Share of "
                                                            "generated scans smoothed as `detect` smooths a fine "
                                                            "scan before the segmenter's grid; > 0 also resamples "
                                                            "the phantom and validation scans as `detect` does."),
                        fat_like_marrow_p: float = _share(0.0, "--fat-like-marrow-p", help="Share of "
                                                          "fat-suppressed generated scans whose fat is as dark as "
                                                          "the suppressed marrow (0.8-1.25x): marrow is fat, and "
                                                          "both are suppressed alike."),
                        stop_at: Optional[int] = typer.Option(None, "--stop-at", min=1,
                                                              help="End at this step (validated, checkpointed), "
                                                              "the learning rate still decaying over --steps."),
                        data_workers: int = _WORKERS, fresh_per_step: Optional[int] = _FRESH):
    """Train the 3D UNet++ femur segmenter (Dice + CE) on label-driven scans and/or phantoms."""
    if anchor_weight > 0 and not init:
        raise BmlError("--anchor-weight needs --init: the network to stay near", None,
                       "give --init CHECKPOINT, or leave --anchor-weight out")
    if anchor_scope not in ("all", "lesions"):
        raise BmlError(f"--anchor-scope {anchor_scope!r} is not one of all, lesions", None,
                       "give --anchor-scope all or --anchor-scope lesions")
    if anchor_scope != "all" and anchor_weight == 0:
        raise BmlError("--anchor-scope needs --anchor-weight: without it nothing is anchored", None,
                       "give --anchor-weight W, or leave --anchor-scope out")
    if consistency_weight > 0 and labels is None:
        raise BmlError("--consistency-weight needs --labels: only generated scans come in two contrasts", None,
                       "give --labels LABEL_MAPS, or leave --consistency-weight out")
    if stop_at is not None and stop_at > steps:
        raise BmlError(f"--stop-at {stop_at} is after the end of the schedule (--steps {steps})",
                       hint="--stop-at ends a run early; give a step up to --steps")
    d = _DataOptions(data, labels, bank_cache, phantoms, phantom_fraction, val_data, bank_seed)
    more = {"lesion_p": lesion_p, "max_lesions": max_lesions, "lesion_surface_p": lesion_surface_p,
            "lesion_breach_p": lesion_breach_p, "dark_muscle_p": dark_muscle_p,
            "runtime_smoothing_p": runtime_smoothing_p, "fat_like_marrow_p": fat_like_marrow_p,
            **({"stop_at": stop_at} if stop_at else {}),
            "lesion_weight": lesion_weight, "shell_weight": shell_weight,
            "consistency_weight": consistency_weight, "anchor_weight": anchor_weight,
            "anchor_scope": anchor_scope, **_sample_options(labels, data_workers, fresh_per_step),
            **({"init": init} if init else {})}
    _train_common("segmenter", d, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast, more=more)


@train_app.command("inpainter")
@user_errors
def train_inpainter_cmd(data: Optional[Path] = _DATA, labels: Optional[Path] = _LABELS, out_dir: Path = _OUT,
                        bank_cache: Optional[Path] = _BANK, phantoms: int = _PHANTOMS, bank_seed: int = _BANKSEED,
                        phantom_fraction: Optional[float] = _PFRAC, val_data: Optional[Path] = _VALDATA,
                        config: str = typer.Option("tiny", "--config", help="Preset (tiny, small, fourier, big) or a JSON file."),
                        resolution: str = typer.Option("256", "--resolution", help="Slice size (128, 192, 256, 320, "
                                                       "448), or several separated by commas: one generator for all."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(1e-3, "--lr", min=0.0),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME,
                        autocast: str = _AMP,
                        init: Optional[Path] = typer.Option(None, "--init", help="Start from this generator's "
                                                            "weights (fine-tuning): an inpainter checkpoint or a "
                                                            "float32 inpainter_<R>.onnx of a models folder."),
                        data_workers: int = _WORKERS, fresh_per_step: Optional[int] = _FRESH):
    """Train the LaMa (FFC) generator on healthy slices, GAN-style."""
    resolutions = parse_resolutions(resolution, "--resolution", all_is=list(RESOLUTIONS))
    for r in resolutions:
        if r < 64 or r > 1024 or r % 8:
            raise BmlError(f"--resolution {r} is not a multiple of 8 between 64 and 1024",
                           hint="use 128, 192, 256, 320 or 448")
    d = _DataOptions(data, labels, bank_cache, phantoms, phantom_fraction, val_data, bank_seed)
    more = {**_sample_options(labels, data_workers, fresh_per_step), **({"init": init} if init else {})}
    _train_common("inpainter", d, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast, resolutions, more=more)


def _post_overrides(floor, opening_mm, closing_mm, min_area_mm2) -> dict:
    """The post-processing options given on the command line; the others come from the
    models folder's postprocess.json (tuned on a validation split) or the defaults."""
    given = {"floor": floor, "opening_mm": opening_mm, "closing_mm": closing_mm, "min_area_mm2": min_area_mm2}
    return {k: v for k, v in given.items() if v is not None}


_RES = typer.Option(None, "--resolution", "-r",
                    help="Inpainting resolution (128, 192, 256, 320, 448); default: the models'.")
_BACKEND = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt or torch (auto: TensorRT if its "
                        "engines are built, else torch on CUDA, else ONNX Runtime).")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu or gpu (gpu falls back to cpu with a warning).")
_MODELS = typer.Option(None, "--models", help="Models folder (manifest.json); default: $BMLTRT_MODELS, "
                       "else the shipped models.")
_PRECISION = typer.Option("auto", "--precision", help="auto, fp32 or fp16 (auto: fp16 for TensorRT, else fp32; fp16 "
                          "runs the FP16 graphs; ONNX Runtime on a CPU computes them in float32).")
_ENGINES = typer.Option(None, "--engines", help="TensorRT engines folder (default: engines/ or $BMLTRT_ENGINES).")
_FLOOR = typer.Option(None, "--floor", min=0.0, max=1.0,
                      help="Minimum difference (HE units, 0-1) a lesion pixel must exceed "
                      "(default for this and the next three: the models' postprocess.json, else built-in).")
_OPEN = typer.Option(None, "--opening-mm", min=0.0, max=20.0, help="Opening footprint radius, mm (0-20).")
_CLOSE = typer.Option(None, "--closing-mm", min=0.0, max=20.0, help="Closing footprint radius, mm (0-20).")
_MINAREA = typer.Option(None, "--min-area-mm2", min=0.0, max=10_000.0,
                        help="Smallest lesion island kept per slice, mm^2 (0-10000).")


def _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size=8,
              precision="auto", engines=None, seg_batch_size=None, cuda_graphs=False, torch_compile=False,
              mirror=True):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    be, warns = make_backend(backend, device, models, precision=precision, engines_dir=engines,
                             cuda_graphs=cuda_graphs, torch_compile=torch_compile)
    warns = list(warns)
    for flag, on, takes in (("--cuda-graphs", cuda_graphs, ("torch", "tensorrt")),
                            ("--torch-compile", torch_compile, ("torch",))):
        if on and be.name not in takes:
            warns.append(f"{flag} applies to the {' and '.join(takes)} backend(s), not {be.name}: ignored")
    if engines is not None and be.name != "tensorrt":
        warns.append(f"--engines applies to the tensorrt backend, not {be.name}: ignored")
    for w in warns:
        print_warning(w)
    cfg = DetectConfig(resolution=resolution, batch_size=batch_size, seg_batch_size=seg_batch_size, mirror_tta=mirror,
                       post_overrides=_post_overrides(floor, opening_mm, closing_mm, min_area_mm2))
    det = Detector(be, cfg, run_warnings=warns)  # the fallbacks said on the terminal go into every report too
    prepare = getattr(be, "prepare", None)
    if prepare:  # load the networks now: a missing engine or graph fails before the first scan
        prepare(["segmenter", det.inp_name])
    return det


def _check_out_dir(out_dir: Path) -> None:
    from bmltrt.io.outputs import os_error

    if out_dir.exists() and not out_dir.is_dir():
        raise BmlError("the output path (-o) is a file, not a folder", out_dir, "choose a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out_dir, "make the output folder") from None
    # an existing folder this user cannot write into is found now, not after the first scan
    try:
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".bmltrt-probe-"):
            pass
    except OSError as exc:  # named by the folder, not by the probe's own (random) name
        raise os_error(OSError(exc.errno, exc.strerror), out_dir, "write into the output folder") from None


@app.command()
@user_errors
def detect(
    scans: List[str] = typer.Argument(..., help="NIfTI files, DICOM series folders, folders of NIfTI files, or globs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS, precision: str = _PRECISION,
    force_orientation: bool = typer.Option(False, "--force-orientation", help="Accept non-sagittal acquisitions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace complete outputs of an earlier run."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=4096, help="Slices per inpainting batch."),
    echo: Optional[int] = typer.Option(None, "--echo", min=1, max=64,
                                       help="DICOM multi-echo series: which echo (1 = shortest TE, the default)."),
    floor: Optional[float] = _FLOOR, opening_mm: Optional[float] = _OPEN, closing_mm: Optional[float] = _CLOSE,
    min_area_mm2: Optional[float] = _MINAREA,
    engines: Optional[Path] = _ENGINES,
    seg_batch_size: Optional[int] = typer.Option(None, "--seg-batch-size", min=1, max=256,
                                                 help="Patches per segmenter batch, 1-256 (default 2 on the CPU, "
                                                 "4 on the GPU)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Capture CUDA graphs per batch shape "
                                     "(torch, TensorRT; off by default: not yet measured)."),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="torch.compile the torch backend's "
                                       "networks (off by default: not yet measured)."),
    mirror: bool = typer.Option(True, "--mirror/--no-mirror", help="Average the femur segmentation with that of "
                                "the mirrored knee (on by default: a steadier femur for twice the segmenter's time)."),
):
    """Find bone marrow lesions: <name>_bml.nii.gz, _femur.nii.gz, _report.json, _overlay.png per scan."""
    from rich.table import Table

    from bmltrt.io.inputs import expand_inputs, is_regular_file
    from bmltrt.io.outputs import OutputSet, is_nifti_name, nifti_stem, os_error
    from bmltrt.report import CHECK_FEMUR, SUMMARY_NAME, check_summary_writable, write_outputs, write_summary

    if out_dir.exists() and not out_dir.is_dir():
        raise BmlError("the output path (-o) is a file, not a folder", out_dir, "choose a folder")
    found = expand_inputs(scans, echo)
    for note in found.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    sources = found.sources
    nifti_given = [src for src in sources if getattr(src, "series", None) is None]
    if echo is not None and nifti_given:
        print_warning("--echo applies to DICOM series only: ignored for the NIfTI inputs"
                      + (f" ({len(nifti_given)} of {len(sources)})" if len(nifti_given) < len(sources) else ""))
    if not sources and not found.problems:
        raise BmlError("no scans to run", " ".join(scans), "give NIfTI files, or folders of NIfTI or DICOM files")
    if not sources and len(found.problems) == 1:
        raise found.problems[0]
    stems: dict[str, object] = {}
    for src in sources:
        key = src.stem.lower()  # case-insensitive: K.nii.gz and k.nii.gz collide on macOS and Windows
        if key in stems:
            raise BmlError(f"two inputs would write the same outputs ({src.stem}_*)", src.label,
                           f"rename one of {stems[key]} and {src.label}, or run them into different --out folders")
        stems[key] = src.label
    inputs = [f for src in sources for f in src.files if is_regular_file(f)]  # never raises (EACCES)
    det = _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size,
                    precision, engines, seg_batch_size, cuda_graphs, torch_compile, mirror)
    made_out_dir = not out_dir.exists()
    _check_out_dir(out_dir)
    check_summary_writable(out_dir, overwrite, inputs)
    rows, failed = [], 0
    failures: list[tuple[str, str, str]] = []  # (name, input, error line), for the summary

    def fail(name: str, source, line: str) -> None:
        nonlocal failed
        failed += 1
        print_error(line)
        # absolute, as in the reports: the summary is read from other folders
        failures.append((name, os.path.abspath(source) if source and source != "?" else str(source), line))
        rows.append((escape(printable(name)), "-", "-", "-", "-", "[red]failed[/]"))

    for err in found.problems:
        name = Path(str(err.path)).name if err.path else "?"
        fail(nifti_stem(name) if is_nifti_name(name) else name, err.path or "?", err.line())
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        pass
    done = 0
    try:
        with _progress() as prog:
            task = prog.add_task("scans", total=len(sources), status="")
            stage = prog.add_task("stage", total=1, status="")
            for src in sources:
                prog.update(task, status=escape(printable(src.stem)))
                try:
                    OutputSet(out_dir, src.stem).check_writable(overwrite, inputs)  # before the work, not after
                    scan = src.load(force_orientation)

                    def progress(what, n_done, total):
                        prog.update(stage, description=what, completed=n_done, total=total)

                    result = det.detect_checked(scan, progress)
                    write_outputs(result, out_dir, overwrite, inputs)
                    r = result.report
                    for w in r["warnings"]:
                        if w not in det.run_warnings:  # those were said once, before the first scan
                            print_warning(f"{src.label}: {w}")
                    rows.append((escape(printable(src.stem)), str(r["lesion_count"]), f"{r['lesion_volume_mm3']:.1f}",
                                 f"{r['femur_volume_mm3'] / 1000:.1f}", f"{r['timings_s']['total_s']:.1f}",
                                 "[green]ok[/]" if r["femur_check"]["plausible"] else f"[yellow]{CHECK_FEMUR}[/]"))
                    done += 1
                except BmlError as err:
                    fail(src.stem, src.label, err.line())
                except MemoryError:
                    fail(src.stem, src.label, f"out of memory on {src.label} | use a smaller --batch-size or more memory")
                except Exception as exc:  # a bug: log it, say where, go on with the batch
                    log = log_internal_error(exc, src.label, out_dir)
                    fail(src.stem, src.label, internal_error_line(exc, src.label, log))
                prog.advance(task)
    except KeyboardInterrupt as exc:
        sig = "SIGTERM" if isinstance(exc, Interrupted) else "interrupt"
        print_error(f"{sig}: stopped after {done} of {len(sources)} scans; no partial output set is left "
                    f"| outputs in {out_dir}")
        _INTERRUPT_SAID.append(True)
        raise typer.Exit(143 if isinstance(exc, Interrupted) else 130)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    n_all = len(sources) + len(found.problems)
    if done or n_all > 1:  # one scan refused: its error line is the whole answer
        say(f"bmltrt detect: {done} of {n_all} scans done "
            f"({det.backend.name}, {det.backend.device}, {det.backend.precision}, res {det.resolution})")
        t = Table()
        for c in ("scan", "lesions", "lesion mm3", "femur cm3", "seconds", "status"):
            t.add_column(c)
        for row in rows:
            t.add_row(*row)
        out.print(t)
    if made_out_dir and not any(out_dir.iterdir()):  # every scan failed: no empty folder left behind
        out_dir.rmdir()
    elif done:
        say(f"outputs in {out_dir}")
        try:
            summary = write_summary(out_dir, failures)
        except OSError as exc:
            raise os_error(exc, out_dir / SUMMARY_NAME, "write the summary") from None
        if summary is not None:
            say(f"summary of the folder's scans in {summary}")
    det.backend.close()
    if failed:
        raise typer.Exit(2)


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("bmltrt-demo"), "--out", "-o",
                                 help="Where the phantom and the outputs go (default ./bmltrt-demo, ignored by git)."),
    seed: int = typer.Option(5, "--seed", min=0, help="Phantom seed (the same seed, the same knee)."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS,
):
    """Make a phantom knee with known lesions, run detect on it, print Dice against the truth."""
    from bmltrt.io import load_scan
    from bmltrt.evaluation.metrics import confusion, lesion_detection, scores
    from bmltrt.report import write_outputs
    from bmltrt.io.outputs import SYNTH_DESCRIP, OutputSet, folder_beside, is_our_mask, move_in, os_error
    from bmltrt.synth.dataset import write_case
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    det = _detector(resolution, backend, device, models, None, None, None, None)
    # A rerun replaces the demo's own files, never a user's: input/ may hold only the phantom's
    # three files, marked in their header as generated (a demo older than that mark is refused
    # too), and outputs must be ones bmltrt wrote.
    inp = out_dir / "input"
    own = {inp / kind / "demo_knee.nii.gz" for kind in ("images", "femur", "lesion")}
    stray = [f for f in inp.rglob("*") if not f.is_dir() and (f not in own or not is_our_mask(f, SYNTH_DESCRIP))] \
        if inp.is_dir() else []
    if stray:
        raise BmlError("the demo's input/ folder holds a file that the demo did not write", stray[0],
                       "choose another --out folder")
    OutputSet(out_dir, "demo_knee").check_writable(overwrite=True)  # a folder where an output goes; a live lock
    foreign = OutputSet(out_dir, "demo_knee").foreign()
    if foreign:
        raise BmlError("a file that bmltrt did not write is where a demo output goes", foreign[0],
                       "move it away or choose another --out folder")
    _check_out_dir(out_dir)
    say(f"writing the phantom and the outputs to {out_dir.resolve()}")
    ph = make_phantom([seed, 0], PhantomConfig(n_lesions=(2, 2)))
    # The phantom is made whole beside the folder, then moved in with the earlier run's
    # outputs removed first: an interrupted demo leaves its folder as it was, or a phantom
    # without outputs, never a phantom beside the outputs of another one.
    with folder_beside(out_dir, "demo") as stage:
        try:
            write_case(stage, "input", "demo_knee", ph)
        except OSError as exc:
            raise os_error(exc, out_dir, "write the phantom") from None
        move_in(stage, out_dir, last="input", drop_first=[p.name for p in OutputSet(out_dir, "demo_knee").paths.values()])
    scan_path = out_dir / "input" / "images" / "demo_knee.nii.gz"
    scan = load_scan(scan_path)
    result = det.detect_checked(scan)
    paths = write_outputs(result, out_dir, overwrite=True)  # the demo's own files: a rerun replaces them
    truth = load_scan(out_dir / "input" / "lesion" / "demo_knee.nii.gz", is_mask=True).data > 0
    femur = load_scan(out_dir / "input" / "femur" / "demo_knee.nii.gz", is_mask=True).data > 0
    les = scores(confusion(result.lesion, truth))
    fem = scores(confusion(result.femur, femur))
    dt = lesion_detection(result.lesion, truth)
    r = result.report
    say(f"phantom knee with {dt['n_true']} lesion(s) (3D components, {sum(ph.info['lesion_volumes_mm3']):.0f} mm3): "
        f"{scan_path}")
    say(f"found {r['lesion_count']} lesion(s), {r['lesion_volume_mm3']:.0f} mm3 in "
        f"{r['timings_s']['total_s']:.1f} s ({r['backend']}, {r['device']}, {r['precision']}, res {r['resolution']})")
    say(f"lesion Dice {les['dice']:.3f}  IoU {les['iou']:.3f}  sensitivity {les['sensitivity']:.3f}  "
        f"lesions detected {dt['detected']}/{dt['n_true']}  femur Dice {fem['dice']:.3f}")
    for k, v in paths.items():
        say(f"  {k:8s} {v}")


@app.command()
@user_errors
def export(
    segmenter: Optional[Path] = typer.Option(None, "--segmenter", help="Segmenter checkpoint.pt."),
    inpainter: List[Path] = typer.Option([], "--inpainter", help="Inpainter checkpoint.pt (repeatable, one per resolution; or one, exported at --resolutions or at every resolution it was trained at)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Export the one --inpainter at these resolutions, e.g. 128,192,256,320,448, or all (those five)."),
    from_onnx: Optional[Path] = typer.Option(None, "--from-onnx", help="Start from the float32 graphs of this models folder; --segmenter/--inpainter checkpoints given too replace its graphs of that name."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Models folder to write (one that holds an export: with --overwrite only)."),
    precision: str = typer.Option("both", "--precision", help="fp32, fp16 or both (fp16 keeps the float32 graphs as reference)."),
    default_resolution: Optional[int] = typer.Option(None, "--default-resolution", min=64, max=2048,
                                                     help="The inpainting size detect uses by default (one that is "
                                                          "exported; default: 256, or the nearest exported)."),
    calibration_cases: int = typer.Option(2, "--calibration-cases", help="Phantom knees for FP16 calibration (0: islands by rule only)."),
    calibration_seed: int = typer.Option(11, "--calibration-seed", min=0, max=2**31 - 1),
    bound: float = typer.Option(1e4, "--fp16-bound", help="Nodes whose calibrated |activation| exceeds this stay float32."),
    fp16_io: bool = typer.Option(False, "--fp16-io", help="FP16 graphs take and give float16 (default: float32 I/O)."),
    no_lint: bool = typer.Option(False, "--no-lint", help="Skip `polygraphy check lint`."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the export already in --out (its graphs "
                                   "that this export does not make are removed)."),
):
    """Export checkpoints (or float32 ONNX) to a models folder: float32 and FP16 graphs, checked, with a manifest."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("export needs torch", hint="pip install 'bmltrt[export]'") from None
    from bmltrt.export.build import make_models
    from bmltrt.io.outputs import check_folder_path
    from bmltrt.training.checkpoint import load_weights

    for p, kind, module in [(segmenter, "segmenter", "net")] + [(p, "inpainter", "gen") for p in inpainter]:
        if p is None:
            continue
        if p.is_dir():
            raise BmlError(f"--{kind} is a folder, not a checkpoint file", p,
                           "give the run's checkpoint.pt or best.pt inside it")
        if not p.is_file():
            raise BmlError("checkpoint not found", p, f"give {kind} checkpoint.pt of a `bmltrt train {kind}` run")
        if p.suffix.lower() == ".onnx":
            raise BmlError(f"--{kind} takes a training checkpoint (.pt), not a graph", p,
                           "give the graph's models folder as --from-onnx")
        load_weights(p, kind, module, graphs=False)  # a checkpoint of this kind, readable: before minutes of work
    if from_onnx is not None and not (from_onnx / "manifest.json").exists():
        raise BmlError("not a models folder (no manifest.json)", from_onnx)
    check_folder_path(out_dir, "the models folder (--out)", "choose a folder")
    res = parse_resolutions(resolutions, all_is=list(RESOLUTIONS))
    man = make_models(out_dir, segmenter=segmenter, inpainters=list(inpainter), resolutions=res,
                      from_onnx=from_onnx, precision=precision, default_resolution=default_resolution,
                      calibration_cases=calibration_cases, calibration_seed=calibration_seed, bound=bound,
                      fp16_io=fp16_io, lint=not no_lint, overwrite=overwrite, warn=print_warning,
                      progress=lambda what: console.print(f"[dim]{escape(what)}[/]", highlight=False))
    for k, e in sorted(man["models"].items()):
        for prec, v in sorted(e["precisions"].items(), reverse=True):
            extra = ""
            if "islands" in v:
                c = v["islands"]["counts"]
                extra = f"  float32 islands {', '.join(f'{n} {r}' for r, n in c.items()) or 'none'}"
                if "activation_ranges" in v:
                    extra += f"  max|act| {v['activation_ranges']['max_abs']:.4g}"
            out.print(f"{k:15s} {prec}  {v['file']:26s} sha256 {v['sha256'][:12]}{extra}", highlight=False)
    say(f"models folder {out_dir} (manifest.json); checks PASSED")


@app.command("export-check")
@user_errors
def export_check(
    models: Path = typer.Argument(..., help="Models folder with float32 and FP16 graphs (bmltrt export --precision both)."),
    data: Path = typer.Option(..., "--data", help="Phantom dataset (bmltrt synth) whose split is used."),
    split: str = typer.Option("val", "--split"),
    out_dir: Path = typer.Option(Path("benchmarks/results/fp16_parity"), "--out", "-o", help="Where parity.json and parity.md go."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Comma-separated, or all; default: all in the folder."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N scans of the split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in -o."),
):
    """FP16 against float32, honestly (graphs run op by op in torch, float16 kernels): NaN/Inf, Dice, reconstruction error."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("export-check needs torch", hint="pip install 'bmltrt[export]'") from None
    from bmltrt.export.parity import parity_report
    from bmltrt.io.outputs import check_folder_path, refuse_earlier_results
    from bmltrt.synth.dataset import case_paths

    _check_dataset(data, "--data")
    check_folder_path(out_dir, "the output path (-o)", "choose a folder")  # before minutes of computing
    refuse_earlier_results(out_dir, ("parity.json", "parity.md"), overwrite)
    if split not in ("train", "val", "test") or not case_paths(data, split):
        raise BmlError(f"--split {split!r} is not a split with cases in this dataset", data,
                       "choose train, val or test (dataset.json lists them)")
    res = parse_resolutions(resolutions, all_is=None)  # all: every one in the folder, as when not given
    rep = parity_report(models, data, split, out_dir, res, limit,
                        progress=lambda what: console.print(f"[dim]{escape(what)}[/]", highlight=False))
    say((out_dir / "parity.md").read_text())
    if rep["failed"]:
        say(f"FAILED: {'; '.join(rep['failed'])}")
        raise typer.Exit(1)
    out.print("PASSED")


@app.command("build-engines")
@user_errors
def build_engines_cmd(
    models: Optional[Path] = _MODELS,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Engines folder (default: engines/, git-ignored, "
                                           "or $BMLTRT_ENGINES)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Inpainter resolutions, comma-separated "
                                              "(default, or all: every one in the models folder)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 (from the FP16 graphs), fp32, or both."),
    max_batch: int = typer.Option(16, "--max-batch", help="Largest batch of the optimisation profile (min 1)."),
    workspace: float = typer.Option(4.0, "--workspace", help="Builder workspace pool limit, GiB."),
    opt_level: int = typer.Option(3, "--opt-level", help="TensorRT builder optimisation level, 0..5."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, read and updated "
                                                "(default: <out>/timing_<gpu>_trt<version>.cache)."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that fit this GPU and TensorRT."),
):
    """Build TensorRT engines (strongly typed, FP16 from the FP16 graphs) for this GPU; skip those that fit."""
    from rich.table import Table

    from bmltrt.runtime import engines as eng
    from bmltrt.runtime.models import ModelStore
    from bmltrt.io.outputs import check_folder_path
    from bmltrt.runtime.trt_build import BuildOptions, build_engines, plan_jobs

    res = parse_resolutions(resolutions, all_is=None)  # all: every one in the folder, as when not given
    precs = {"both": ("fp16", "fp32")}.get(precision, (precision,))
    opts = BuildOptions(precisions=precs, max_batch=max_batch, workspace_gib=workspace, opt_level=opt_level,
                        timing_cache=timing_cache, force=force)
    # every option and the models folder first (plan_jobs needs no TensorRT), then TensorRT and the GPU
    opts.validate()
    dest = out_dir or eng.default_engines_dir()
    given = "--out" if out_dir else "$BMLTRT_ENGINES" if os.environ.get("BMLTRT_ENGINES") else "the engines folder"
    check_folder_path(dest, given, "give a folder for the engines (--out)")
    if timing_cache is not None:
        if timing_cache.is_dir():
            raise BmlError("--timing-cache is a folder, not a file", timing_cache, "give a file name, e.g. trt.cache")
        check_folder_path(timing_cache.parent, "--timing-cache's folder", "give a file in an existing folder")
        if not timing_cache.parent.is_dir():
            raise BmlError("--timing-cache's folder does not exist", timing_cache, "make it, or give another file")
    store = ModelStore.open(models)
    jobs = plan_jobs(store, res, opts)  # graphs of every asked resolution and precision, their shapes
    trt = eng.require_tensorrt(here="engines are built on the GPU machine that runs them")
    gpu = eng.current_gpu()
    say(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}): "
        f"{len(jobs)} engine(s) into {dest}")
    with _progress() as prog:
        total = prog.add_task("engines", total=len(jobs), status="")
        phase = prog.add_task("phase", total=None, status="", visible=False)

        def on_job(job, status, why):
            if status == "building":
                prog.update(total, status=f"{job.model} {job.precision}" + (f" ({why})" if why else ""))
            else:
                prog.advance(total)

        def on_event(kind, name, a, b):
            if kind == "start":
                prog.update(phase, description=str(name)[:40], completed=0, total=b or None, visible=True)
            elif kind == "step":
                prog.update(phase, completed=int(a) + 1)
            else:
                prog.update(phase, visible=False)

        rows = build_engines(store, dest, jobs, opts, trt, gpu, on_job, on_event)
    t = Table(title=f"bmltrt build-engines: TensorRT {trt.__version__}, {gpu.name}")
    for c in ("model", "precision", "status", "why", "seconds", "plan"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"], r["precision"], r["status"], r["why"], f"{r['seconds']:.0f}", Path(r["plan"]).name)
    out.print(t)


@app.command()
@user_errors
def doctor():
    """Say which backends can run here, with versions and the GPU, and why others cannot."""
    from rich.table import Table

    from bmltrt.doctor import check

    t = Table(title="bmltrt doctor")
    for c in ("component", "status", "version", "detail"):
        t.add_column(c)
    for r in check():
        t.add_row(escape(r["component"]), "[green]ok[/]" if r["ok"] else "[yellow]missing[/]", escape(r["version"]),
                  escape(r["detail"]))
    out.print(t)


# `bmltrt evaluate ...` and `bmltrt train autoencoder|mkd` live with the evaluation code.
from bmltrt.evaluation.cli import register  # noqa: E402

register(app, train_app)

# `bmltrt bench` lives with the benchmark code.
from bmltrt.bench.cli import register as register_bench  # noqa: E402

register_bench(app)


def main():
    app()


if __name__ == "__main__":
    main()
