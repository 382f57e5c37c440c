"""Hugging Face Hub ids → local folders: the local HF cache first, a download only if allowed.

``resolve(spec)`` turns what a user names where a model or PEFT folder is accepted into a
folder on disk, as transformers' ``from_pretrained`` does:

1. an existing directory is returned as is (a local folder always wins over a Hub id of the
   same spelling);
2. otherwise ``spec`` must be a Hub id, ``name``, ``org/name`` or either with ``@revision``
   (a branch, tag or 40-hex commit; ``org/name@refs/pr/1`` too), checked strictly before
   any path is built from it: no ``..``, no leading ``/``, ``.`` or ``-``, no ``--`` in the
   name;
3. the id is looked up in the HF cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``, read from the environment at call time) without any
   network access: ``<cache>/models--org--name/refs/<revision>`` names a commit, and
   ``snapshots/<commit>/`` is the folder. A cached revision is used as is: a branch is not
   checked for newer commits (pin ``@<commit>``, or delete the cache entry to refresh);
4. only when it is not cached and the network is allowed (neither ``HF_HUB_OFFLINE`` nor
   ``TRANSFORMERS_OFFLINE`` is set) is it downloaded into that cache, restricted to the
   top-level files this project reads (``HUB_FILES``: JSON configs, ``model*.safetensors``,
   ``adapter_model.safetensors``, tokenizer files); never pickles (``.bin``, ``.pt``).

Every failure is one ``ValueError`` line naming the option, the spec, the cache folder
searched and why. Only ``str`` specs can be Hub ids: a ``pathlib.Path`` names a place on
disk and is returned unchanged. ``huggingface_hub`` is imported only when a Hub id is
resolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The files read from a model or PEFT repository (fnmatch patterns on top-level names).
HUB_FILES = ("*.json", "model*.safetensors", "adapter_model.safetensors", "tokenizer.model",
             "vocab.txt", "merges.txt")

_PART = r"\w(?:[\w.-]*\w)?"   # a name: word characters, '.' and '-' inside only
_HUB_ID = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<revision>\w[\w.-]*"
                     rf"(?:/\w[\w.-]*)*))?\Z", re.ASCII)
_TRUE = ("1", "ON", "YES", "TRUE")


def parse_id(spec: str) -> tuple[str, str | None] | None:
  """``(repo_id, revision or None)`` if ``spec`` is a well-formed Hub id, else None.

  The syntax of the Hub (``huggingface_hub.utils.validate_repo_id``) plus git's rules for
  revisions, checked here because the revision becomes a path under ``refs/``.
  """
  m = _HUB_ID.match(spec)
  if m is None or len(m["repo"]) > 96 or ".." in spec or "--" in m["repo"] \
      or m["repo"].endswith(".git"):
    return None
  return m["repo"], m["revision"]


def cache_dir() -> Path:
  """The HF hub cache folder as ``huggingface_hub`` would choose it from the environment now
  (it reads its constants once at import, so a later change of the variables would be
  missed)."""
  env = os.environ
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if not path:
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache",
                                              "huggingface")
    path = os.path.join(home, "hub")
  return Path(os.path.expandvars(os.path.expanduser(path)))


def offline_reason() -> str | None:
  """Which setting forbids network access (``"HF_HUB_OFFLINE=1"``), or None."""
  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    value = os.environ.get(name, "")
    if value.upper() in _TRUE:
      return f"{name}={value}"
  from huggingface_hub import constants
  return "HF_HUB_OFFLINE (set when huggingface_hub was imported)" if constants.HF_HUB_OFFLINE \
      else None


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _download_failure(e: Exception, revision: str | None) -> str:
  from huggingface_hub import errors
  if isinstance(e, errors.GatedRepoError):
    return "it is a gated repository on the Hub (request access, then `hf auth login`)"
  if isinstance(e, errors.RepositoryNotFoundError):
    return "not found on the Hub (a private repository needs `hf auth login`)"
  if isinstance(e, errors.RevisionNotFoundError):
    return f"the Hub repository has no revision {revision!r}"
  if isinstance(e, errors.LocalEntryNotFoundError):   # what a failed connection becomes
    return f"the Hub could not be reached ({_first_line(e.__cause__ or e)})"
  return f"the download failed ({_first_line(e)})"


def resolve(spec: str | os.PathLike, *, option: str = "model") -> Path:
  """The local folder named by ``spec``: itself if it is a directory, else the snapshot of
  the Hub id it spells, from the HF cache or (network allowed) downloaded into it.

  ``option`` names the input in error messages (``--model``, ``PEFT folder``). Raises
  ``ValueError`` (one line) when ``spec`` is a file, neither a folder nor a Hub id, or a Hub
  id found neither in the cache nor, where allowed, on the Hub.
  """
  if not isinstance(spec, str):
    return Path(spec)
  if not spec:   # Path("") would be the working directory
    raise ValueError(f"{option}: empty, expected a folder or a Hugging Face Hub id")
  path = Path(spec)
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{option} {spec}: is a file, not a folder")
  parsed = parse_id(spec)
  if parsed is None:
    raise ValueError(f"{option} {spec}: not a folder, and not a Hugging Face Hub id "
                     "('name', 'org/name' or 'org/name@revision')")
  repo_id, revision = parsed
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError
  cache = cache_dir()
  kw = dict(revision=revision, cache_dir=cache, allow_patterns=list(HUB_FILES),
            ignore_patterns=["*/*"])
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kw))
  except LocalEntryNotFoundError:
    pass   # not cached (or cached incompletely): a download may still find it
  where = f"{option} {spec}: not a local folder, not in the HF cache {cache}"
  offline = offline_reason()
  if offline:
    raise ValueError(f"{where}, and offline ({offline})")
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, **kw))
  # A download fails in many ways (HTTP, proxy, auth, disk): each becomes one line naming it.
  except Exception as e:   # noqa: BLE001
    raise ValueError(f"{where}, and {_download_failure(e, revision)}") from None


__all__ = ["HUB_FILES", "cache_dir", "offline_reason", "parse_id", "resolve"]
