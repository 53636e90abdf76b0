"""The `alignfast` command: demo | train | eval | bench | info.

    alignfast demo [--output-dir DIR]          the embedded world, offline, on a laptop CPU
    alignfast train --config run.yaml [--section.key value ...]
    alignfast eval  --config run.yaml --checkpoint DIR [--oracle-checkpoint DIR]
    alignfast aligner train --config aligner.yaml [--resume]   an Aligner corrector by SFT
    alignfast correct --aligner DIR --upstream MODEL --data FILE --output FILE
    alignfast bench [NAME ...] [--device cuda] [--record]
    alignfast info                             which kernel implements each op on each device

User errors (a missing file, an unknown config key, a model that cannot be found offline) end in one
line on stderr and exit code 2; the subcommands live in their own modules and import torch and
transformers only when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from alignfast.cli.error_output import print_error
from alignfast.cli.errors import CLIError

EPILOG = "Run `alignfast <command> --help` for a command's options. Docs: README.md of the repository."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignfast",
        description="Align a frozen LLM with a small trained model beside it, on fused kernels: a prompter "
                    "(Align-Pro, arXiv 2501.03486), a corrector (Aligner, arXiv 2402.02416) or a token-level proxy "
                    "(Proxy-RLHF, arXiv 2403.04283).",
        epilog=EPILOG)
    from alignfast import __version__

    parser.add_argument("--version", action="version", version=f"alignfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS:
        module.add_parser(sub)
    return parser


def _command_modules():
    import importlib

    return [importlib.import_module(f"alignfast.cli.cmd_{name}") for name in COMMAND_NAMES]


# Order of `alignfast --help`.
COMMAND_NAMES = ("demo", "train", "eval", "aligner", "correct", "bench", "info")
_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    # transformers imports torchao whenever it is installed (alignfast[lowbit]); torch then logs a deprecation
    # line per Enum constant torchao registers, which nothing in a user's command can act on.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if not _COMMANDS:
        _COMMANDS.extend(_command_modules())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from alignfast.cli.errors import name_fields_for_this_command

    name_fields_for_this_command({})
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.run(args, extra) or 0)
        from alignfast.trainer.distributed import end_processes

        end_processes()  # a run under torchrun / accelerate launch: its process group, before teardown
        return code
    except CLIError as err:
        from alignfast.cli.errors import in_run_file_terms

        print_error(f"alignfast {args.command}: error: {in_run_file_terms(str(err))}")
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # An output path that is a file, a folder that cannot be written: the user's to fix, in one line.
        print_error(f"alignfast {args.command}: error: {err.strerror}: {err.filename}")
        return 2
    except KeyboardInterrupt as err:
        # TrainingInterrupted: SIGTERM/SIGINT, checkpoint written; StoppedAtOnce: a second one, the step or the
        # final save abandoned. Either line says what is left and how to continue; the code is 128 + the signal's.
        if getattr(err, "exit_code", None):
            line = err.line(how="the same command with --resume")
            if os.environ.get("RANK", "0") in ("0", ""):  # every process stops after the same step: one line
                print(f"alignfast {args.command}: {line}", file=sys.stderr)
            return err.exit_code
        print(f"alignfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - alignfast's own user-facing errors in one line; anything else re-raised
        from alignfast.cli.errors import in_run_file_terms, known_error_line

        line = known_error_line(err)
        if line is None:
            raise
        print_error(f"alignfast {args.command}: error: {in_run_file_terms(line)}")
        return 2
    finally:
        if "alignfast.trainer.output_lock" in sys.modules:  # the command's run is over: its output_dir is free
            sys.modules["alignfast.trainer.output_lock"].release_command_locks()


if __name__ == "__main__":
    sys.exit(main())
