"""The ``audiopetl`` command: argument parsing and dispatch to the library.

Every sub-command is a thin layer over a library function; options are validated
before any work starts, and boolean options are real flags (``--x/--no-x``).
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  audiopetl demo                                   # offline, ~2 minutes on 2 CPU cores
  audiopetl train --dataset esc50 --data-root ESC-50-master --method lora --run-dir runs/esc50-lora
  audiopetl predict runs/esc50-lora/fold1/adapter.safetensors clip.wav --top-k 3
  audiopetl reproduce table1 --data esc50=ESC-50-master --data fsc=fluent_speech_commands_dataset
  audiopetl report runs/table1
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiopetl",
        description="Parameter-efficient transfer learning of Audio Spectrogram Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import commands as impl

    for name, (help_text, add_arguments, _) in impl.COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=_DefaultsFormatter)
        add_arguments(sub)
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not for unset flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    from . import commands as impl

    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = impl.COMMANDS[args.command]
    try:
        result = run(args)
    except (ValueError, OSError, RuntimeError) as error:
        # Bad input, a failed run and operating-system trouble (read-only or full folder...)
        # all end the same way: one message naming the file or option, and a non-zero status.
        print(f"audiopetl {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    return 0



def _describe(error: BaseException) -> str:
    """The error's message; for a bare OSError (``[Errno 13] Permission denied: 'x'``) a sentence."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror.lower()}: {str(error.filename)!r} (check the path and its permissions)"
    return str(error)


if __name__ == "__main__":
    raise SystemExit(main())
