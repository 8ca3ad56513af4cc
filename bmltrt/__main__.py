"""`bmltrt` and `python -m bmltrt`. The command line module imports numpy, rich and typer
(a few tenths of a second): Ctrl-C in that time gets the CLI's one line, not a traceback."""

import sys


def main() -> None:
    try:
        from bmltrt.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupt: stopped before the end | run the command again\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
