"""`rpe library <subcommand> LIBRARY ...`: the adapter library from the command line.

    rpe library init LIB
    rpe library add LIB NAME ADAPTER.safetensors PROTOTYPE.npy --base-model M --encoder E
                    --n-samples N [--pooling mean] [--metadata JSON|@file.json] [--replace]
    rpe library import-peft LIB NAME PEFT_FOLDER|HUB_ID PROTOTYPE.npy --model HF_FOLDER|HUB_ID|demo
                    --encoder E --n-samples N [--base-model M (default: the PEFT config's)]
    rpe library export-peft LIB NAME OUT_FOLDER --model HF_FOLDER|HUB_ID|demo
    rpe library list LIB [--encoder E] [--base-model M]
    rpe library show LIB NAME
    rpe library query LIB PROTOTYPES.npy [-k 8] [--encoder E] [--exclude NAME ...]
    rpe library remove LIB NAME [NAME ...]
    rpe library verify LIB [--repair] [--quick]

Every subcommand takes ``--json``. ``add``, ``list``, ``show``, ``remove`` and ``verify`` do
not import JAX.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rpe_jax.library import adapter_file, untrusted
from rpe_jax.cli import outputs
from rpe_jax.cli.model_spec import load_model
from rpe_jax.library.catalog import Entry, Library, LibraryError


def _emit(args, obj, text: str) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True) if args.json else text)


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    x = untrusted.read_npy(path, what)
    if x.ndim not in (1, 2):
      raise LibraryError(f"{what} file {path}: expected a vector [d] or a batch [B, d], got "
                         f"shape {list(x.shape)}")
    return untrusted.check_float32(x, f"{what} file {path}")
  except untrusted.UntrustedInputError as e:
    raise LibraryError(str(e)) from None


def _metadata(text: str | None) -> dict | None:
  if text is None:
    return None
  try:
    if text.startswith("@"):
      source = f"--metadata file {text[1:]}"
      meta = untrusted.read_json(text[1:], "--metadata file")
    else:
      source = "--metadata"
      meta = untrusted.loads_json(text, source)
  except untrusted.UntrustedInputError as e:
    raise LibraryError(str(e)) from None
  if not isinstance(meta, dict):
    raise LibraryError(f"{source} must be a JSON object, got {type(meta).__name__}")
  return meta


def _entry_line(e: Entry) -> str:
  return (f"{e.name}\tbase={e.base_model}\tencoder={e.encoder}[{e.prototype.shape[0]}]"
          f"\trank={e.rank}\t{e.dtype}\tlayers={len(e.signature.layers)}"
          f"\tn={e.n_samples}\t{e.created[:19]}")


# --- subcommands -------------------------------------------------------------------------

def _init(args) -> int:
  lib = Library.create(args.library)
  lib.close()
  _emit(args, {"library": str(Path(args.library).resolve()), "created": True},
        f"created adapter library {args.library}")
  return 0


def _add_entry(args, lib: Library, adapter, base_model: str, task: str | None = None) -> Entry:
  """Add with the entry's task recorded in its metadata (``--task``, or the model's)."""
  prototype = _load_npy(args.prototype, "prototype")
  metadata = _metadata(args.metadata) or {}
  task = args.task or task
  if task is not None:
    if metadata.get("task", task) != task:
      raise LibraryError(f"--metadata says task {metadata['task']!r} but the adapter is a "
                         f"{task} adapter")
    metadata["task"] = task
  return lib.add(args.name, adapter, prototype, base_model=base_model, encoder=args.encoder,
                 n_samples=args.n_samples, metadata=metadata or None,
                 replace=args.replace, pooling=args.pooling)


def _add(args) -> int:
  tensors, _ = adapter_file.read_tensors(args.adapter)
  with Library.open(args.library, timeout=args.timeout) as lib:
    entry = _add_entry(args, lib, tensors, args.base_model)
  _emit(args, entry.to_json(), f"added {_entry_line(entry)}")
  return 0


def _import_peft(args) -> int:
  from models import hub
  from rpe_jax.library import peft_io
  # A Hub id is resolved before the (slower) model loads, so a missing one fails fast.
  folder = hub.resolve(args.folder, option="PEFT folder")
  model = load_model(args.model)
  adapter = peft_io.read_peft(folder, model)
  from rpe_jax.tasks.contract import model_task_name
  task = model_task_name(model)
  if args.task is not None and args.task != task:
    raise LibraryError(f"--task {args.task}: the model is a {task} model")
  base_model = args.base_model
  if base_model is None:
    config = untrusted.read_json(folder / peft_io.CONFIG_NAME)
    base_model = config.get("base_model_name_or_path")
    if not base_model:
      raise LibraryError("--base-model is required: the PEFT folder's adapter_config.json "
                         "names no base_model_name_or_path")
  with Library.open(args.library, timeout=args.timeout) as lib:
    entry = _add_entry(args, lib, adapter, base_model, task)
  _emit(args, entry.to_json(), f"imported {_entry_line(entry)}")
  return 0


def _export_peft(args) -> int:
  from rpe_jax.library import peft_io
  with Library.open(args.library, readonly=True) as lib:
    entry = lib.get(args.name)
    adapter = lib.load(args.name)
  model = load_model(args.model)
  folder = outputs.check_folder(args.folder, option="output folder", overwrite=args.overwrite,
                                names=f"{peft_io.CONFIG_NAME} and {peft_io.WEIGHTS_NAME}")
  with outputs.staged(folder, prefix=".tmp-export-") as staging:
    peft_io.write_peft(adapter, model, staging / "peft", base_model_name_or_path=entry.base_model)
    outputs.install(staging, folder, sorted((staging / "peft").iterdir()))
  _emit(args, {"name": args.name, "folder": str(folder)},
        f"exported {args.name} to {folder}")
  return 0


def _list(args) -> int:
  with Library.open(args.library, readonly=True) as lib:
    entries = lib.entries(encoder=args.encoder, base_model=args.base_model)
  _emit(args, [e.to_json() for e in entries],
        "\n".join(_entry_line(e) for e in entries) or "(empty library)")
  return 0


def _show(args) -> int:
  with Library.open(args.library, readonly=True) as lib:
    entry = lib.get(args.name)
  layers = "\n".join(f"  {l.path}: [{l.d_in}, {l.d_out}] {l.kind} rank {l.rank} {l.dtype}"
                     for l in entry.signature.layers)
  text = (f"{_entry_line(entry)}\nid {entry.id}\nsha256 {entry.sha256} ({entry.size} bytes)"
          f"\npooling {entry.pooling}\nmetadata {json.dumps(entry.metadata)}\n"
          f"layers:\n{layers}")
  _emit(args, entry.to_json(), text)
  return 0


def _query(args) -> int:
  z = _load_npy(args.prototypes, "prototypes")
  with Library.open(args.library, readonly=True) as lib:
    r = lib.query(z, args.k, encoder=args.encoder, exclude=tuple(args.exclude or ()))
  names = np.atleast_2d(r.names)
  dist = np.atleast_2d(np.asarray(r.distances))
  idx = np.atleast_2d(np.asarray(r.indices))
  out = [{"names": list(n), "distances": d.tolist(), "indices": i.tolist()}
         for n, d, i in zip(names, dist, idx)]
  text = "\n".join(f"[{b}] " + "  ".join(f"{n} ({d:.6g})" for n, d in zip(o["names"],
                                                                         o["distances"]))
                   for b, o in enumerate(out))
  _emit(args, out if z.ndim == 2 else out[0], text)
  return 0


def _remove(args) -> int:
  with Library.open(args.library, timeout=args.timeout) as lib:
    unknown = [n for n in args.names if n not in lib]
    if unknown:
      raise LibraryError(f"no adapter named {unknown[0]!r} in library {args.library}; "
                         "nothing removed")
    for name in args.names:
      lib.remove(name)
  _emit(args, {"removed": args.names}, "\n".join(f"removed {n}" for n in args.names))
  return 0


def _verify(args) -> int:
  from tqdm import tqdm
  with Library.open(args.library, readonly=not args.repair, timeout=args.timeout) as lib:
    report = lib.verify(repair=args.repair, check_files=not args.quick,
                        progress=lambda rows: tqdm(rows, desc="verify", unit="adapter",
                                                   file=sys.stderr, disable=None))
  obj = dict(report._asdict(), ok=report.ok)
  lines = [f"checked {report.checked} adapters: " + ("ok" if report.ok else "PROBLEMS")]
  lines += [f"catalog damaged: {m}" for m in report.integrity]
  if args.repair and report.integrity and report.orphans:
    lines += ["orphans not removed: the catalog failed its integrity check"]
  lines += [f"invalid entry: {n}" for n in report.invalid]
  lines += [f"missing file: {n}" for n in report.missing]
  lines += [f"corrupt file: {n}" for n in report.corrupt]
  lines += [f"orphan file: {n}" + (" (removed)" if n in report.removed else "")
            for n in report.orphans]
  _emit(args, obj, "\n".join(lines))
  return 0 if report.ok else 1


# --- argparse ----------------------------------------------------------------------------

def _add_options(p: argparse.ArgumentParser, *, base_required: bool = True) -> None:
  p.add_argument("prototype", help="task prototype, a .npy vector [d] (float32)")
  p.add_argument("--base-model", required=base_required,
                 help="id of the base model the adapter was trained on")
  p.add_argument("--encoder", required=True, help="id of the encoder of the prototype")
  p.add_argument("--pooling", default="mean", help="encoder pooling (default: mean)")
  p.add_argument("--n-samples", type=int, required=True,
                 help="size of the dataset the prototype was averaged over")
  p.add_argument("--metadata", help="JSON object, or @file.json (license, source, task)")
  p.add_argument("--task", choices=("classification", "segmentation", "report"),
                 help="the adapter's task, recorded so that a composition never mixes tasks "
                 "(import-peft: the model's, by default)")
  p.add_argument("--replace", action="store_true", help="replace an entry of the same name")


def configure(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="subcommand", metavar="<subcommand>", required=True)

  def command(name, func, help_, *, write=False):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("library", help="library directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if write:
      p.add_argument("--timeout", type=float, default=10.0,
                     help="seconds to wait for another writer (default 10)")
    p.set_defaults(func=func)
    return p

  command("init", _init, "create an empty library")
  p = command("add", _add, "add an adapter file with its prototype", write=True)
  p.add_argument("name", help="unique adapter name")
  p.add_argument("adapter", help="adapter .safetensors (keys '<path>.a/.e/.b')")
  _add_options(p)
  p = command("import-peft", _import_peft, "add a PEFT adapter folder", write=True)
  p.add_argument("name", help="unique adapter name")
  p.add_argument("folder", help="PEFT folder (adapter_config.json + adapter_model.safetensors) "
                 "or its Hugging Face Hub id (org/name[@revision])")
  _add_options(p, base_required=False)
  p.add_argument("--model", required=True,
                 help="the base model: a Hugging Face checkpoint folder or Hub id "
                 "(org/name[@revision]), or 'demo'")
  p = command("export-peft", _export_peft, "write an adapter as a PEFT folder")
  p.add_argument("name", help="adapter name")
  p.add_argument("folder", help="output folder")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an existing non-empty folder the tool did not write "
                 "(only adapter_config.json and adapter_model.safetensors are replaced)")
  p.add_argument("--model", required=True,
                 help="the base model: a Hugging Face checkpoint folder or Hub id "
                 "(org/name[@revision]), or 'demo'")
  p = command("list", _list, "list the adapters")
  p.add_argument("--encoder", help="only this encoder's adapters")
  p.add_argument("--base-model", help="only this base model's adapters")
  p = command("show", _show, "show one adapter's catalog entry")
  p.add_argument("name", help="adapter name")
  p = command("query", _query, "nearest adapters to prototypes")
  p.add_argument("prototypes", help=".npy of one prototype [d] or a batch [B, d]")
  p.add_argument("-k", type=int, default=8, help="neighbours per prototype (default 8)")
  p.add_argument("--encoder", help="encoder id (default: the library's only one)")
  p.add_argument("--exclude", nargs="*", metavar="NAME", help="names to leave out")
  p = command("remove", _remove, "remove adapters", write=True)
  p.add_argument("names", nargs="+", metavar="name", help="adapter name(s)")
  p = command("verify", _verify, "check every file against the catalog", write=True)
  p.add_argument("--repair", action="store_true", help="delete orphan files")
  p.add_argument("--quick", action="store_true", help="check files exist, skip sha256")


def run(args) -> int:
  return args.func(args)
