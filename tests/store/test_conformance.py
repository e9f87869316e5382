"""One conformance suite, run against every backend (zarr on disk, zarr over fsspec, HDF5)."""
from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import zarr

from kdcache.errors import StoreError
from kdcache.store import LogitStore, Manifest, create_store, open_store


def make_manifest(n=1000, members=2, classes=7, dtype="float16", chunk_rows=128, **kw):
    return Manifest(num_samples=n, num_classes=classes, num_members=members, dtype=dtype, chunk_rows=chunk_rows,
                    members=[{"name": f"m{i}", "spec": f"mlp:{i}", "sha256": f"{i:064x}"} for i in range(members)],
                    dataset={"spec": "synthetic:1000", "name": "synthetic", "split": None, "length": 5000,
                             "fingerprint": "ab" * 32, "subset": None}, **kw)


def make_rows(m: Manifest, seed=0):
    g = np.random.default_rng(seed)
    z = g.normal(0, 3, (m.num_samples, m.num_members, m.num_classes)).astype(m.dtype)
    ids = g.permutation(5000)[:m.num_samples].astype(np.int64)  # a subset, in the writer's order
    y = g.integers(-1, m.num_classes, m.num_samples)
    return z, ids, y


def write_all(store, z, ids, y, chunks=None):
    cr = store.manifest.chunk_rows
    for c in (range(store.manifest.num_chunks) if chunks is None else chunks):
        a = c * cr
        store.write_block(a, z[a:a + cr], ids[a:a + cr], y[a:a + cr])


def tamper(path, fn, digest=True):
    """Apply ``fn`` to the manifest dict with the backend's own library, as another writer would
    (with a matching manifest digest), or as damage would (``digest=False``)."""
    from kdcache.store.format import manifest_digest
    if path.endswith(".h5"):
        with h5py.File(path, "r+") as f:
            d = fn(json.loads(f.attrs["kdcache"]))
            f.attrs["kdcache"] = json.dumps(d)
            if digest:
                f.attrs["kdcache_manifest_sha256"] = manifest_digest(d)
    else:
        g = zarr.open_group(path, mode="r+")
        d = fn(dict(g.attrs["kdcache"]))
        g.attrs["kdcache"] = d
        if digest:
            g.attrs["kdcache_manifest_sha256"] = manifest_digest(d)


class TestStoreConformance:
    @pytest.mark.parametrize("dtype", ["float16", "float32"])
    def test_write_then_read_back(self, store_path, dtype):
        m = make_manifest(dtype=dtype)
        z, ids, y = make_rows(m)
        s = create_store(store_path, m)
        write_all(s, z, ids, y)
        s.mark_complete()
        s.close()
        r = open_store(store_path)
        assert r.manifest.complete and r.manifest.dtype == dtype
        assert r.manifest.identity() == m.identity()
        blk = r.read(0, m.num_samples)
        np.testing.assert_array_equal(blk.logits, z)
        np.testing.assert_array_equal(blk.sample_ids, ids)
        np.testing.assert_array_equal(blk.labels, y)
        parts = list(r.iter_blocks(300))
        assert all(p.start % m.chunk_rows == 0 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.logits for p in parts]), z)
        assert r.verify() == []

    def test_multi_chunk_block_and_partial_last_chunk(self, store_path):
        m = make_manifest(n=1000, chunk_rows=300)  # 4 chunks, the last of 100 rows
        z, ids, y = make_rows(m)
        s = create_store(store_path, m)
        s.write_block(0, z[:600], ids[:600], y[:600])   # two chunks in one call
        s.write_block(600, z[600:], ids[600:], y[600:])
        s.mark_complete()
        np.testing.assert_array_equal(open_store(store_path).read(550, 1000).logits, z[550:])

    def test_resume_after_crash(self, store_path):
        m = make_manifest()
        z, ids, y = make_rows(m)
        s = create_store(store_path, m)
        write_all(s, z, ids, y, chunks=[0, 2, 5])
        del s  # the writer dies here: no mark_complete
        with pytest.raises(StoreError, match=r"incomplete \(3 of 8 chunks written\)"):
            open_store(store_path)
        partial = open_store(store_path, allow_partial=True)
        assert partial.written_chunks().tolist() == [True, False, True, False, False, True, False, False]
        partial.close()
        s = create_store(store_path, make_manifest())  # the same thing again: resumed, not replaced
        todo = np.flatnonzero(~s.written_chunks())
        assert todo.tolist() == [1, 3, 4, 6, 7]
        write_all(s, z, ids, y, chunks=todo)
        s.mark_complete()
        np.testing.assert_array_equal(open_store(store_path).read(0, 1000).logits, z)

    def test_refuses_complete_store_without_overwrite(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        write_all(s, *make_rows(m))
        s.mark_complete()
        s.close()
        with pytest.raises(StoreError, match="already holds a complete store; pass overwrite"):
            create_store(store_path, make_manifest())
        np.testing.assert_array_equal(open_store(store_path).read(0, 10).logits, make_rows(m)[0][:10])
        s = create_store(store_path, make_manifest(classes=3), overwrite=True)
        assert s.manifest.num_classes == 3 and not s.written_chunks().any()

    def test_refuses_to_resume_something_else(self, store_path):
        s = create_store(store_path, make_manifest())
        write_all(s, *make_rows(make_manifest()), chunks=[0])
        s.close()
        with pytest.raises(StoreError,
                           match="incomplete store of something else .differs in num_classes, num_members, members"):
            create_store(store_path, make_manifest(classes=5, members=3))
        assert open_store(store_path, allow_partial=True).written_chunks()[0]

    def test_refuses_unknown_format_version(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        write_all(s, *make_rows(m))
        s.mark_complete()
        s.close()
        tamper(store_path, lambda d: {**d, "format_version": 99})
        with pytest.raises(StoreError, match=r"format_version 99 found, this kdcache reads version 1"):
            open_store(store_path)

    def test_refuses_a_manifest_damaged_behind_its_digest(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        write_all(s, *make_rows(m))
        s.mark_complete()
        s.close()
        tamper(store_path, lambda d: {**d, "num_classes": d["num_classes"]}, digest=False)
        open_store(store_path).close()  # the same manifest: still sound
        tamper(store_path, lambda d: {**d, "created_at": "2001-01-01T00:00:00Z"}, digest=False)
        with pytest.raises(StoreError, match=r"the manifest does not match its sha256"):
            open_store(store_path)

    def test_a_damaged_chunk_is_refused_on_read_and_listed_by_verify(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        z, ids, y = make_rows(m)
        write_all(s, z, ids, y)
        s.mark_complete()
        s.close()
        w = LogitStore(store_path, writable=True)  # a change behind the digests, as damage would make
        w._b.array("labels")[m.chunk_rows:m.chunk_rows + 1] = np.array([(y[m.chunk_rows] + 2) % 3 - 1])  # chunk 1
        w.close()
        s = open_store(store_path)
        s.read(0, m.chunk_rows)  # chunk 0 is sound
        with pytest.raises(StoreError, match=r"chunk 1 \(rows .*\) does not match its stored sha256"):
            s.read(m.chunk_rows + 5, m.chunk_rows + 6)  # a single row: its whole chunk is checked
        assert any("chunks 1 do not match" in p for p in s.verify())
        s.close()

    def test_refuses_missing_manifest_field(self, store_path):
        create_store(store_path, make_manifest()).close()
        tamper(store_path, lambda d: {k: v for k, v in d.items() if k != "members"})
        with pytest.raises(StoreError, match="manifest lacks members"):
            open_store(store_path, allow_partial=True)

    def test_refuses_shape_disagreeing_with_manifest(self, store_path):
        create_store(store_path, make_manifest()).close()
        tamper(store_path, lambda d: {**d, "num_classes": 8})
        with pytest.raises(StoreError, match=r"array 'logits' has shape \(1000, 2, 7\).*implies \(1000, 2, 8\)"):
            open_store(store_path, allow_partial=True)

    def test_refuses_missing_array(self, store_path):
        create_store(store_path, make_manifest()).close()
        if store_path.endswith(".h5"):
            with h5py.File(store_path, "r+") as f:
                del f["labels"]
        else:
            zarr.open_group(store_path, mode="r+").__delitem__("labels")
        with pytest.raises(StoreError, match="array 'labels' is missing"):
            open_store(store_path, allow_partial=True)

    def test_refuses_non_finite_logits_naming_ids(self, store_path):
        m = make_manifest()
        z, ids, y = make_rows(m)
        z = z.astype(np.float32)
        z[5, 1, 2] = np.nan
        z[7, 0, 0] = 1e6  # overflows float16
        s = create_store(store_path, m)
        with pytest.raises(StoreError, match=rf"2 sample\(s\), sample ids {ids[5]}, {ids[7]}"):
            s.write_block(0, z[:128], ids[:128], y[:128])
        assert not s.written_chunks().any()

    def test_refuses_unaligned_block(self, store_path):
        m = make_manifest()
        z, ids, y = make_rows(m)
        s = create_store(store_path, m)
        with pytest.raises(StoreError, match="not aligned to chunks of 128 rows"):
            s.write_block(10, z[10:138], ids[10:138], y[10:138])

    def test_pickles_as_path(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        write_all(s, *make_rows(m))
        s.mark_complete()
        s.close()
        r = open_store(store_path)
        blob = pickle.dumps(r)
        assert len(blob) < 1000
        r2 = pickle.loads(blob)
        np.testing.assert_array_equal(r2.read(0, 5).logits, r.read(0, 5).logits)

    def test_verify_names_corrupt_chunk(self, store_path):
        m = make_manifest()
        s = create_store(store_path, m)
        write_all(s, *make_rows(m))
        s.mark_complete()
        s.close()
        if store_path.endswith(".h5"):
            with h5py.File(store_path, "r+") as f:
                f["logits"][300, 0, 0] = 42.0
        else:
            zarr.open_group(store_path, mode="r+")["logits"][300, 0, 0] = 42.0
        problems = open_store(store_path).verify()
        assert problems == ["chunks 2 do not match their stored sha256"]


    def test_per_token_store_keeps_its_sequence_index(self, store_path):
        from kdcache.store.format import sequence_lengths_digest
        lengths = np.array([5, 1, 17, 3, 9, 40, 2, 11], dtype=np.int64)
        seq_ids = np.array([7, 0, 3, 12, 5, 1, 9, 4], dtype=np.int64)  # a subset, in the writer's order
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        seqs = {"count": len(lengths), "max_length": int(lengths.max()),
                "lengths_sha256": sequence_lengths_digest(lengths)}
        m = make_manifest(n=int(lengths.sum()), chunk_rows=16, sequences=seqs)
        z, _, y = make_rows(m)
        ids = np.repeat(seq_ids, lengths)
        with pytest.raises(StoreError, match="sequence index"):
            create_store(store_path, m)
        s = create_store(store_path, m, sequence_index=(seq_ids, offsets))
        write_all(s, z, ids, y, chunks=[0, 1])
        s.close()
        s = create_store(store_path, m, sequence_index=(seq_ids, offsets))  # resumes the same thing
        write_all(s, z, ids, y, chunks=range(2, m.num_chunks))
        s.mark_complete()
        s.close()
        r = open_store(store_path)
        assert r.manifest.per_token and r.manifest.sequences == seqs and r.verify() == []
        got_ids, got_off = r.sequence_index()
        np.testing.assert_array_equal(got_ids, seq_ids)
        np.testing.assert_array_equal(got_off, offsets)
        blk = r.read_sequences(2, 4)  # crosses a chunk boundary
        np.testing.assert_array_equal(blk.logits, z[offsets[2]:offsets[4]])
        assert set(blk.sample_ids) == {3, 12}
        r.close()
        other = dict(seqs, lengths_sha256=sequence_lengths_digest(lengths[::-1]))
        with pytest.raises(StoreError, match="complete store"):
            create_store(store_path, make_manifest(n=m.num_samples, chunk_rows=16, sequences=other),
                         sequence_index=(seq_ids, offsets))

    def test_row_per_sample_manifest_has_no_sequences_field(self, store_path):
        s = create_store(store_path, make_manifest())
        assert "sequences" not in s.manifest.to_dict()  # as before per-token stores existed
        assert not s.manifest.per_token


def test_never_deletes_something_that_is_not_a_store(tmp_path):
    d = tmp_path / "precious.zarr"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    with pytest.raises(StoreError, match="exists and is not a readable kdcache store"):
        create_store(str(d), make_manifest(), overwrite=True)
    assert (d / "thesis.txt").read_text() == "years of work"


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(StoreError, match=r"end it in \.zarr, \.h5 or \.hdf5, or pass format"):
        create_store(str(tmp_path / "x.bin"), make_manifest())
