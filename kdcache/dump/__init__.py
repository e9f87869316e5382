"""Stage one: run the teacher (or every member of an ensemble) once over a dataset and fill a store.

``config`` says what a dump is asked (:class:`DumpConfig`); ``samplers`` the order the data is read
in, whole store chunks at a time; ``writer`` the thread that encodes and writes chunks; ``stage``
the run itself (:func:`dump_logits`) on one process or every torchrun rank, and the store cache.
"""
from kdcache.dump.config import DumpConfig, DumpSummary
from kdcache.dump.samplers import Batches, ChunkBatches, SequenceChunkBatches, SequenceIndex, token_unit_chunks
from kdcache.dump.stage import dump_logits, prepare
from kdcache.dump.writer import predictions

__all__ = ["DumpConfig", "DumpSummary", "Batches", "ChunkBatches", "SequenceChunkBatches", "SequenceIndex",
           "token_unit_chunks", "dump_logits", "prepare", "predictions"]
