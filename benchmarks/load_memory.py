"""Host memory of loading a sharded bfloat16 Llama checkpoint: ``models.hf.load`` vs HF.

A ~1 B-parameter Llama checkpoint (bfloat16, several safetensors shards plus the index) is
generated tensor by tensor with safetensors directly (no torch model is instantiated), then
loaded in fresh processes, one per row:

* ours: ``models.hf.load(folder, dtype=bfloat16)`` on one CPU device;
* ours, 8 devices: the same onto a ``data=2,model=4`` mesh of 8 fake CPU devices with the
  ``fsdp_tp`` preset (``shardings=`` from ``rpe_jax.parallel.sharding.state_shardings``; every
  kernel split 8 ways, so the mesh holds the model about once): every device gets only its
  slice, read on its own;
* baseline (``--baseline-root``, e.g. the integration checkout): the same call with the
  loader of another checkout of this project, for a before/after figure;
* HF: ``transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)``; it
  memory-maps the shards and the parameters stay views of the page cache until read, so a
  second row ("touched") reads every parameter once (a sum) after loading: what running
  the model makes resident.

Memory: peak RSS (VmHWM, reset through /proc/self/clear_refs after the imports) minus the
RSS of the idle process (imports done, devices initialised), over the checkpoint's size on
disk; "held" is the RSS after loading minus idle (the model itself). One process per row,
MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave the resident set.

  python benchmarks/load_memory.py                    # generate, measure, delete
  python benchmarks/load_memory.py --baseline-root /work/main --keep /tmp/llama1b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# ~0.98 B parameters, ~1.8 GiB in bfloat16 (Llama-3.2-1B widths, 14 layers, a 32k vocab)
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
              hidden_size=2048, intermediate_size=8192, num_hidden_layers=14,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
              hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
              mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """HF LlamaForCausalLM checkpoint keys → shapes ([out, in] for Linear weights)."""
  h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
            "lm_head.weight": (v, h)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
  return shapes


def generate(folder: Path, cfg: dict = CONFIG, shard_bytes: int = 500 * 2**20, seed: int = 0) -> int:
  """Write a random bf16 checkpoint in shards of about ``shard_bytes``; returns its size."""
  import torch
  from safetensors.torch import save_file

  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg, indent=2))
  gen = torch.Generator().manual_seed(seed)
  shapes = tensor_shapes(cfg)
  groups, current, size = [], [], 0
  for key, shape in shapes.items():
    n = 2 * int(torch.tensor(shape).prod()) if shape else 2
    if current and size + n > shard_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(key)
    size += n
  groups.append(current)
  weight_map, total = {}, 0
  for j, keys in enumerate(groups):
    name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {}
    for key in keys:
      t = torch.randn(shapes[key], generator=gen, dtype=torch.float32).mul_(0.02)
      tensors[key] = t.to(torch.bfloat16) if "norm" not in key else torch.ones(shapes[key], dtype=torch.bfloat16)
      del t
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    del tensors
    weight_map.update({k: name for k in keys})
    total += (folder / name).stat().st_size
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
  return total


def _status() -> dict[str, int]:
  out = {}
  for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
      key, val = line.split(":")
      out[key] = int(val.split()[0]) * 1024
  return out


def worker(kind: str, folder: str) -> dict:
  if kind in ("hf", "hf_touched"):
    import torch
    import transformers
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    done = lambda model: ([float(p.float().sum()) for p in model.parameters()]
                          if kind == "hf_touched" else None)
  else:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from models import hf
    jax.devices()
    shardings = None
    if kind == "ours_mesh":
      from rpe_jax.parallel.sharding import make_mesh, state_shardings
      mesh = make_mesh("data=2,model=4")
      shardings = lambda m: state_shardings(nnx.state(m), mesh, model_type=m.config,
                                            preset="fsdp_tp")
    kw = {} if shardings is None else dict(shardings=shardings)
    load = lambda: hf.load(folder, dtype=jnp.bfloat16, **kw)
    done = lambda model: jax.block_until_ready(nnx.state(model))
  open("/proc/self/clear_refs", "w").write("5")
  idle = _status()["VmRSS"]
  t0 = time.perf_counter()
  model = load()
  done(model)
  seconds = time.perf_counter() - t0
  st = _status()
  return dict(peak_bytes=st["VmHWM"] - idle, held_bytes=st["VmRSS"] - idle,
              idle_bytes=idle, seconds=seconds)


def spawn(kind: str, folder: Path, root: Path) -> dict:
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(root))
  if kind == "ours_mesh":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--folder", str(folder)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(root))
  if proc.returncode != 0:
    raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], size: int, params: int, load: tuple) -> str:
  gib = lambda x: f"{x / 2**30:.2f}"
  lines = [f"Checkpoint: {params / 1e9:.2f} B parameters, bfloat16, {gib(size)} GiB in "
           f"{rows[0]['shards']} safetensors shards; load average {load[0]:.1f} at start, "
           f"{load[1]:.1f} at end.", "",
           "| loader | peak RSS above idle (GiB) | peak / checkpoint | held after load (GiB) "
           "| held / checkpoint | time (s) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['label']} | {gib(r['peak_bytes'])} | {r['peak_bytes'] / size:.2f}× "
                 f"| {gib(r['held_bytes'])} | {r['held_bytes'] / size:.2f}× | {r['seconds']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--folder", help="use this checkpoint folder (generated when missing)")
  p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
  p.add_argument("--baseline-root", help="another checkout whose loader to measure too")
  p.add_argument("--no-hf", action="store_true", help="skip transformers' from_pretrained")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.folder)))
    return 0

  tmp = None
  folder = Path(args.folder) if args.folder else None
  if folder is None:
    tmp = tempfile.mkdtemp(prefix="llama1b_", dir=os.environ.get("TMPDIR", "/tmp"))
    folder = Path(tmp)
  try:
    if not (folder / "model.safetensors.index.json").exists():
      print(f"generating {folder} ...", file=sys.stderr, flush=True)
      generate(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    size = sum((folder / s).stat().st_size for s in shards)
    params = sum(int(__import__("math").prod(s)) for s in tensor_shapes(
        json.loads((folder / "config.json").read_text())).values())
    load0 = os.getloadavg()
    kinds = [("ours", "models.hf.load (this checkout), 1 CPU device", ROOT),
             ("ours_mesh", "models.hf.load (this checkout), 8 CPU devices, fsdp_tp", ROOT)]
    if args.baseline_root:
      kinds.append(("ours", f"models.hf.load ({args.baseline_root}), 1 CPU device",
                    Path(args.baseline_root)))
    if not args.no_hf:
      kinds += [("hf", "transformers from_pretrained (torch, bf16; lazy mmap)", ROOT),
                ("hf_touched", "transformers from_pretrained, every parameter read once", ROOT)]
    rows = []
    for kind, label, root in kinds:
      row = spawn(kind, folder, root)
      row.update(label=label, kind=kind, shards=len(shards))
      rows.append(row)
      print(f"{label}: peak {row['peak_bytes'] / size:.2f}× (load {os.getloadavg()[0]:.1f})",
            file=sys.stderr, flush=True)
    md = table(rows, size, params, (load0[0], os.getloadavg()[0]))
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(
        dict(size_bytes=size, params=params, shards=len(shards), load_avg=load0,
             load_avg_end=os.getloadavg(), rows=rows), indent=1))
    (out / "load_memory.md").write_text(md + "\n")
    print(f"wrote {out}/load_memory.{{json,md}}", file=sys.stderr)
  finally:
    if tmp and not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
