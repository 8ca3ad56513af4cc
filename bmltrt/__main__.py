"""`bmltrt` and `python -m bmltrt`. The command line module imports numpy, rich and typer
and typer builds the commands (about half a second): Ctrl-C or SIGTERM in that time gets
the CLI's one line and exit code, not a traceback or silence."""

import signal
import sys

from bmltrt.errors import Interrupted, interrupt_line, raise_interrupted


def main() -> None:
    try:
        signal.signal(signal.SIGTERM, raise_interrupted)  # each command installs its own as well
    except ValueError:  # not the main thread
        pass
    try:
        from bmltrt.cli import main as run

        run()
    except KeyboardInterrupt as exc:  # before any command's own handling began (or after it ended)
        term = isinstance(exc, Interrupted)
        sys.stderr.write(f"error: {interrupt_line(term)}\n")
        sys.exit(143 if term else 130)


if __name__ == "__main__":
    main()
