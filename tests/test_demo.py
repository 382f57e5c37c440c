"""README command one, `python -m rpe_jax.compose` with no arguments, at the demo's test size.

The demo's own code path (rpe_jax.demo via rpe_jax.cli.compose.main) runs with
RPE_JAX_DEMO_SIZE=tiny (16-px images, a 2-layer ViT, one epoch) in a temporary cache: two
concurrent first runs build it and leave one valid cache; a second run reuses it untouched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rpe_jax import demo
from rpe_jax.tasks import classification as train
from rpe_jax.tasks import images as data
from rpe_jax.library import Library
from rpe_jax.cli.compose import main

ROOT = Path(__file__).resolve().parents[1]
# Written out here, not read from demo.STRATEGIES, so that dropping one from the demo fails.
ROWS = ("pretrained", "nearest", "avg", "sim", "lin", "sparse", "SFT")


def _table_rows(text):
  """The method names of the printed table's rows (header and rule excluded)."""
  rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
  return [r.split(" ")[0] for r in rows if r != "method"]


def _files(folder):
  """Every cached file's mtime, except SQLite's shared-memory index (-shm), which any reader
  of a WAL database touches."""
  return {p: p.stat().st_mtime_ns for p in folder.rglob("*")
          if p.is_file() and not p.name.endswith("-shm")}


@pytest.mark.slow
def test_demo_builds_one_cache_concurrently_then_reuses_it(tmp_path, monkeypatch, capsys):
  cache = tmp_path / "cache"
  env = dict(os.environ, RPE_JAX_CACHE=str(cache), RPE_JAX_DEMO_SIZE="tiny",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="")
  # Two first runs at once: both build, one rename wins, the other keeps the winner's result.
  procs = [subprocess.Popen([sys.executable, "-m", "rpe_jax.compose"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert _table_rows(out) == list(ROWS), out
  monkeypatch.setenv("RPE_JAX_CACHE", str(cache))
  monkeypatch.setenv("RPE_JAX_DEMO_SIZE", "tiny")
  folder = demo.cache_dir()
  assert folder.parent == cache and sorted(p.name for p in cache.iterdir()) == [folder.name]
  # One cache, no half-built leftovers of the losing build.
  assert sorted(p.name for p in folder.iterdir()) == ["foundation", "library"]
  assert (folder / "foundation" / "config.json").is_file()
  with Library.open(folder / "library", readonly=True) as lib:
    assert sorted(lib.names()) == sorted(data.SITES)
    report = lib.verify()
    assert (report.missing, report.corrupt, report.orphans) == ([], [], [])
  before = _files(folder)

  # The second run loads everything: any training call is an error, and no file changes.
  def no_training(*args, **kwargs):
    raise AssertionError("the second run retrained instead of using the cache")

  monkeypatch.setattr(train, "pretrain_foundation", no_training)
  monkeypatch.setattr(train, "train_adapter", no_training)
  assert main([]) == 0
  out = capsys.readouterr().out
  assert _table_rows(out) == list(ROWS), out
  assert f"library: {folder / 'library'}" in out
  assert _files(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("task", ["segmentation", "report"])
def test_the_other_demos_build_then_reuse_their_cache(task, tmp_path, monkeypatch, capsys):
  """`--demo segmentation|report` at the tiny size: the first run builds a base and one
  adapter per member through the task contract; the second trains nothing."""
  import importlib
  monkeypatch.setenv("RPE_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("RPE_JAX_DEMO_SIZE", "tiny")
  module = importlib.import_module(f"rpe_jax.demo.{task}")
  assert main(["--demo", task]) == 0
  out = capsys.readouterr().out
  assert _table_rows(out) == list(ROWS), out
  folder = module.cache_folder()
  with Library.open(folder / "library", readonly=True) as lib:
    assert sorted(lib.names()) == sorted(module.MEMBERS)
    assert {e.metadata["task"] for e in lib.entries()} == {task}
  before = _files(folder)
  task_class = {"segmentation": "SegmentationTask", "report": "ReportTask"}[task]
  tasks_module = importlib.import_module(f"rpe_jax.tasks.{task}")

  def no_training(*args, **kwargs):
    raise AssertionError("the second run retrained instead of using the cache")

  monkeypatch.setattr(getattr(tasks_module, task_class), "train", no_training)
  monkeypatch.setattr(tasks_module, "pretrain_base", no_training)
  assert main(["--demo", task, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["task"] == task and report["held_out"] == module.HELD_OUT
  assert [r["method"].split(" ")[0] for r in report["results"]] == list(ROWS)
  metric = report["metric"]
  assert all(0.0 <= r[metric] <= 1.0 for r in report["results"])
  # The composed rows' weights are over the other members only, and sum to one.
  for r in report["results"][1:-1]:
    assert module.HELD_OUT not in r["weights"]
    assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5)
  assert _files(folder) == before
  if task == "segmentation":   # a mixed-site target, per sample beside dataset level
    assert main(["--demo", task, "--target", "scanner+blur", "--per-sample", "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["target"].startswith("sites:organs/scanner+blur")
    assert mixed["n_target"] == 2 * report["n_target"]
    for r in mixed["results"][1:-1]:
      assert 0.0 <= r["per_sample"] <= 1.0
      assert sum(r["per_sample_inputs_per_adapter"].values()) >= mixed["n_target"]
    assert _files(folder) == before
