"""The `llmc` command (and `python -m llmc`): interrupts are handled before the CLI (and torch)
is imported, so Ctrl-C during start-up exits 130 with one line instead of a traceback."""
import sys


def main() -> None:
    from llmc.signals import Interrupted, install

    install()
    try:
        from llmc.cli import main as cli_main
        cli_main()
    except Interrupted as e:                 # outside the CLI's own handler: while starting up
        sys.stderr.write(f"{e.message}\n")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
