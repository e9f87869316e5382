"""Logit stores: the on-disk contract between dump-logits and train-student."""
from kdcache.store.block_cache import BlockCache
from kdcache.store.format import FORMAT_VERSION, Manifest, default_chunk_rows
from kdcache.store.logit_store import Block, LogitStore, create_store, detect_format, open_store

__all__ = ["FORMAT_VERSION", "Manifest", "Block", "BlockCache", "LogitStore", "create_store", "open_store",
           "detect_format", "default_chunk_rows"]
