"""The ``acelora`` command. Each area registers its own sub-commands (``add_commands``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``add_commands(subparsers)``; each sub-command sets ``func(args) -> int``.
COMMAND_MODULES = (
    "acelora.models.commands",  # import-official
    "acelora.train.commands",   # demo, train
    "acelora.eval.commands",    # eval zeroshot|multilabel|segment|detect, predict
    "acelora.benchmark",        # bench
)


def build_parser() -> argparse.ArgumentParser:
    from acelora import __version__

    parser = argparse.ArgumentParser(
        prog="acelora",
        description="ACE-LoRA: parameter-efficient adaptation of medical vision-language models.")
    parser.add_argument("--version", action="version", version=f"acelora {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    _add_debug_flag(sub)
    return parser


def _add_debug_flag(subparsers: argparse._SubParsersAction) -> None:
    """``--debug`` after any sub-command too (``acelora train ... --debug``)."""
    for child in set(subparsers.choices.values()):
        if "--debug" not in child._option_string_actions:
            # SUPPRESS: an absent flag must not reset a --debug given before the sub-command.
            child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an error instead of one line")
        for action in child._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug_flag(action)


def _fail(message: str, status: int) -> int:
    text = " ".join(str(message).split()) or "unknown error"  # one line, whatever the message
    print(f"acelora: error: {text}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors are one line on stderr and exit status 2 (``--debug``:
    the traceback)."""
    from acelora import errors

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return _fail("interrupted", errors.EXIT_INTERRUPTED)
    except Exception as exc:
        if args.debug:
            raise
        message = errors.user_error_message(exc)
        if message is not None:
            return _fail(message, errors.EXIT_USER_ERROR)
        message = errors.run_failure_message(exc)
        if message is not None:
            return _fail(message, errors.EXIT_RUN_FAILED)
        raise  # a bug: keep the traceback


if __name__ == "__main__":
    sys.exit(main())
