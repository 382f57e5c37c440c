"""`python -m rpe_jax <command>` and the `rpe` console script: a thin, lazy dispatcher.

Each command lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``.
A module is imported only when its command runs, so ``rpe --help`` is fast and a missing
optional dependency of one command does not break the others.

Conventions for every command: bad input exits with code 2 and one line ``error: <message>``
on stderr (``guarded``: ``ValueError`` — e.g. ``LibraryError`` —, ``OSError`` and the other
``USER_ERRORS`` map to it; ``rpe --traceback ...`` shows the traceback instead); ``--json`` for machine output;
``--help`` everywhere; progress bars (tqdm, on stderr) for long work.
"""

from __future__ import annotations

import argparse
import importlib
import sqlite3
import sys

# command → (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "library": ("rpe_jax.cli.library", "the adapter library: init, add, import-peft, "
                "export-peft, list, show, query, remove, verify"),
    "train": ("rpe_jax.cli.train", "fine-tune LoRA / SVD-LoRA adapters to build a library"),
    "compose": ("rpe_jax.cli.compose", "prototype → retrieve → weigh → compose for a new dataset"),
}

EXIT_BAD_INPUT = 2


def _top_parser() -> argparse.ArgumentParser:
  width = max(len(c) for c in COMMANDS)
  listing = "\n".join(f"  {c:<{width}}  {summary}" for c, (_, summary) in COMMANDS.items())
  parser = argparse.ArgumentParser(
      prog="rpe", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Compose LoRA adapters for a new, unlabeled dataset by retrieving them "
                  "by task prototype (rpe_jax).",
      epilog=f"commands:\n{listing}\n\n`rpe <command> --help` for a command's options.")
  parser.add_argument("--traceback", action="store_true",
                      help="show the full traceback on errors instead of one line")
  parser.add_argument("command", nargs="?", metavar="<command>", help="one of: "
                      + ", ".join(COMMANDS))
  return parser


def error(message: str) -> int:
  """Print the one-line error and return the bad-input exit code."""
  print(f"error: {message}".splitlines()[0], file=sys.stderr)
  return EXIT_BAD_INPUT


# Failures caused by the user's input or environment: one line and exit 2, never a traceback
# (unless --traceback). OSError covers missing, unreadable and unwritable files.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, EOFError, OverflowError, RecursionError, sqlite3.Error)
try:   # safetensors' parse errors derive from Exception only
  from safetensors import SafetensorError
  USER_ERRORS += (SafetensorError,)
except ImportError:   # pragma: no cover - safetensors is a dependency
  pass


def _describe(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename:
    return f"{e.strerror or type(e).__name__}: {e.filename}"
  if isinstance(e, RecursionError):
    return f"input nested too deeply to parse ({e})"
  if isinstance(e, sqlite3.Error):
    return f"SQLite: {e}"
  if type(e).__name__ == "SafetensorError":
    return f"not a readable safetensors file: {e}"
  return str(e) or type(e).__name__


def guarded(call, *, traceback: bool = False) -> int:
  """The one error boundary of every front door: run ``call()`` and map a user error to
  exit 2 with one line (``--traceback`` re-raises instead); Ctrl-C is exit 130."""
  try:
    return int(call() or 0)
  except USER_ERRORS as e:
    if traceback:
      raise
    return error(_describe(e))
  except KeyboardInterrupt:
    return 130


def _load(command: str):
  module_name = COMMANDS[command][0]
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise LookupError(f"command {command!r} is not available in this installation "
                        f"(module {module_name} is missing)") from e
    raise LookupError(f"command {command!r} needs the missing package {e.name!r} "
                      f"(pip install {e.name.split('.')[0]})") from e


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  top = _top_parser()
  # Global options come before the command; everything after it is the command's.
  split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
  try:
    opts = top.parse_args(argv[:split + 1])
  except SystemExit as e:  # --help or an argparse usage error
    return int(e.code or 0)
  if opts.command is None:
    top.print_help(sys.stderr)
    return EXIT_BAD_INPUT
  if opts.command not in COMMANDS:
    return error(f"unknown command {opts.command!r}; commands: {', '.join(COMMANDS)}")
  try:
    module = _load(opts.command)
  except LookupError as e:
    if opts.traceback:
      raise
    return error(str(e))
  parser = argparse.ArgumentParser(prog=f"rpe {opts.command}",
                                   description=COMMANDS[opts.command][1])
  module.configure(parser)
  try:
    args = parser.parse_args(argv[split + 1:])
  except SystemExit as e:
    return int(e.code or 0)
  return guarded(lambda: module.run(args), traceback=opts.traceback)


if __name__ == "__main__":
  sys.exit(main())
