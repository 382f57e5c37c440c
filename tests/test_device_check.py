"""benchmarks/device_check.py --quick runs end to end on CPU and writes a complete table."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("numerics", "vit", "llama", "solver", "retrieval", "compose_8b", "demo")


@pytest.mark.slow
def test_quick_device_check_writes_every_section(tmp_path):
  doc = tmp_path / "accelerators.md"
  # Hand-written text around the markers is kept; what lies between them is replaced.
  doc.write_text("intro by hand\n<!-- device_check: begin -->\nstale table\n"
                 "<!-- device_check: end -->\noutro by hand\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one plain CPU device
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--quick",
       "--out", str(tmp_path), "--doc", str(doc)],
      cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "device_check_quick.json").read_text())
  assert tuple(report["sections"]) == SECTIONS
  text = doc.read_text()
  assert text.startswith("intro by hand\n") and text.endswith("outro by hand\n")
  assert "stale table" not in text
  assert "CPU vs CPU" in text   # a CPU-only run says what its comparison is
  for name in SECTIONS:
    assert f"### {name}:" in text
  for name in ("numerics", "vit", "llama", "solver", "retrieval"):
    sec = report["sections"][name]
    assert sec["status"] == "ok", (name, sec)
    assert sec["rows"] and all(math.isfinite(r["value"]) for r in sec["rows"]), (name, sec)
  assert report["sections"]["compose_8b"]["status"] in ("ok", "not available")
  assert report["sections"]["demo"]["status"] == "skipped"   # only with --demo

  rows = {r["case"]: r["value"] for r in report["sections"]["numerics"]["rows"]}
  kernels = [v for c, v in rows.items() if "attention (device)" in c]
  assert len(kernels) == 3 and max(kernels) < 1e-4   # fused == reference to float32 rounding
  bf16 = [v for c, v in rows.items() if "bf16 vs f32" in c]
  assert len(bf16) == 3 and 0 < min(bf16) and max(bf16) < 0.5   # bf16 differs, but a little
  for name in ("vit", "llama", "solver"):
    assert all(r["value"] > 0 for r in report["sections"][name]["rows"])
