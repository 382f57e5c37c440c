"""The `rpe` dispatcher: lazy commands, help, unknown and missing commands, error mapping."""

import subprocess
import sys
from pathlib import Path

from rpe_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands_without_importing_them(capsys, monkeypatch):
  imported = []
  monkeypatch.setattr(cli.importlib, "import_module", lambda name: imported.append(name))
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(c in out for c in ("library", "train", "compose")) and imported == []
  assert cli.main([]) == 2  # no command: help on stderr, usage exit code
  assert "library" in capsys.readouterr().err


def test_unknown_and_missing_commands(capsys, monkeypatch):
  assert cli.main(["frobnicate"]) == 2
  assert capsys.readouterr().err == (
      "error: unknown command 'frobnicate'; commands: library, train, compose\n")
  monkeypatch.setitem(cli.COMMANDS, "ghost", ("rpe_jax.no_such_module", "not written yet"))
  assert cli.main(["ghost", "--help"]) == 2
  err = capsys.readouterr().err
  assert "command 'ghost' is not available" in err and "rpe_jax.no_such_module" in err


def test_a_commands_missing_dependency_is_named(capsys, monkeypatch, tmp_path):
  (tmp_path / "needs_dep_cmd.py").write_text("import some_absent_package_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(cli.COMMANDS, "needy", ("needs_dep_cmd", "needs a package"))
  assert cli.main(["needy"]) == 2
  assert "needs the missing package 'some_absent_package_xyz'" in capsys.readouterr().err


def test_value_errors_map_to_exit_2_and_traceback_flag_reraises(capsys, monkeypatch, tmp_path):
  (tmp_path / "failing_cmd.py").write_text(
      "def configure(parser):\n  parser.add_argument('--x', type=int, default=0)\n"
      "def run(args):\n  raise ValueError(f'x={args.x} is bad')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(cli.COMMANDS, "failing", ("failing_cmd", "always fails"))
  assert cli.main(["failing", "--x", "3"]) == 2
  assert capsys.readouterr().err == "error: x=3 is bad\n"
  try:
    cli.main(["--traceback", "failing"])
  except ValueError as e:
    assert str(e) == "x=0 is bad"
  else:
    raise AssertionError("--traceback should re-raise")
  assert cli.main(["failing", "--x", "notanint"]) == 2  # argparse usage error
  assert "invalid int value" in capsys.readouterr().err


def test_python_dash_m_entry_point():
  proc = subprocess.run([sys.executable, "-m", "rpe_jax", "library", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  for sub in ("init", "add", "import-peft", "export-peft", "list", "show", "query", "remove",
              "verify"):
    assert sub in proc.stdout
