"""kdcache: run the teacher once, cache its raw logits, distil any number of students from them."""
__version__ = "0.1.0"

from kdcache.errors import KdcacheError, SpecError, StoreError  # noqa: E402
from kdcache.store import FORMAT_VERSION, LogitStore, Manifest, create_store, open_store  # noqa: E402

__all__ = ["__version__", "KdcacheError", "SpecError", "StoreError", "FORMAT_VERSION", "LogitStore",
           "Manifest", "create_store", "open_store"]
