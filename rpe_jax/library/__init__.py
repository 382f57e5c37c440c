"""The adapter library: a durable catalog of adapters and their task prototypes.

* ``catalog``: the library folder (SQLite catalog + one safetensors file per adapter);
* ``adapter_file``: an adapter ⇄ its safetensors file, and its structure signature;
* ``peft_io``: PEFT LoRA folders ⇄ exchange-form adapters.

The catalog's public names are re-exported here: ``from rpe_jax.library import Library``.
Importing this package does not import JAX.
"""

from rpe_jax.library.catalog import (Entry, Library, LibraryBusyError, LibraryError, Prototypes,
                                    VerifyReport)

__all__ = ["Entry", "Library", "LibraryBusyError", "LibraryError", "Prototypes", "VerifyReport"]
