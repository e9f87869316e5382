"""FORMAT.md is enough to read a store: this test reads real stores with plain zarr/h5py/numpy/hashlib only,
following the document, and checks what it finds against the data the stores were dumped from."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from tests.conftest import DATA_ROOT, run_kdcache

FORMAT_MD = Path(__file__).resolve().parent.parent / "kdcache" / "store" / "FORMAT.md"


def doc_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """The dataset fingerprint exactly as FORMAT.md defines it, for float32 inputs."""
    n = len(x)
    idx = np.unique(np.linspace(0, n - 1, min(n, 256)).round().astype(np.int64))
    h = hashlib.sha256(f"kdcache-fingerprint-1;n={n}".encode())
    h.update(f";torch.float32;{tuple(x.shape[1:])}".encode())
    h.update(np.ascontiguousarray(x[idx], dtype=np.float32).tobytes())
    h.update(y[idx].astype(np.int64).tobytes())
    return h.hexdigest()


def read_plain(path: str):
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return (json.loads(f.attrs["kdcache"]), f["logits"][:], f["sample_ids"][:], f["labels"][:],
                    f["chunk_sha256"][:])
    g = zarr.open_group(path, mode="r")
    return (dict(g.attrs["kdcache"]), g["logits"][:], g["sample_ids"][:], g["labels"][:], g["chunk_sha256"][:])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_read_store_with_plain_libraries(tmp_path, suffix):
    out = str(tmp_path / f"ens{suffix}")
    run_kdcache("dump-logits", "--teacher", "mlp:32", "--teacher", "mlp:16", "--dataset", "mnist:test",
                "--subset", "exclude-classes:3", "--chunk-rows", "256", "--out", out)
    manifest, logits, ids, labels, digests = read_plain(out)
    assert manifest["format_version"] == 1 and manifest["complete"] is True and manifest["layout"] == "dense"
    N, M, C, R = manifest["num_samples"], manifest["num_members"], manifest["num_classes"], manifest["chunk_rows"]
    assert logits.shape == (N, M, C) and logits.dtype == np.float16 and (M, C, R) == (2, 10, 256)
    assert digests.shape == (-(-N // R), 32)
    for k in range(len(digests)):
        a, b = k * R, min(k * R + R, N)
        d = hashlib.sha256(logits[a:b].tobytes() + ids[a:b].tobytes() + labels[a:b].tobytes()).digest()
        assert bytes(digests[k]) == d
    with np.load(Path(DATA_ROOT) / "mnist.npz") as f:
        x, y = f["x_test"], f["y_test"]
    assert manifest["dataset"]["length"] == 10000
    assert manifest["dataset"]["subset"] == "exclude-classes:3"
    assert manifest["dataset"]["fingerprint"] == doc_fingerprint(x.astype(np.float32) / 255.0, y)
    np.testing.assert_array_equal(ids, np.flatnonzero(y != 3))  # rows are the transfer set, without 3s
    np.testing.assert_array_equal(labels, y[ids])
    assert [m["spec"] for m in manifest["members"]] == ["mlp:32", "mlp:16"]


def test_format_md_documents_every_manifest_field():
    from dataclasses import fields

    from kdcache.store.format import Manifest
    text = FORMAT_MD.read_text()
    for f in fields(Manifest):
        assert f"| `{f.name}` |" in text, f"FORMAT.md does not document manifest field {f.name}"
    for a in ("logits", "sample_ids", "labels", "chunk_sha256"):
        assert f"| `{a}` |" in text


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_views_replay_with_plain_libraries(tmp_path, suffix):
    """FORMAT.md's "Augmented views": rows are view-major, each row's parameters replay its view with
    numpy alone, bit for bit the input the teacher was given; the digest covers view_params."""
    from kdcache.dump import DumpConfig, dump_logits
    from tests import helpers
    helpers.SEEN_INPUTS.clear()
    out = str(tmp_path / f"views{suffix}")
    dump_logits(DumpConfig(teachers=["tests.helpers:recording_image_teacher"], dataset="mnist:test",
                           subset="0:300", out=out, augment="jitter:2+flip", views=2, chunk_rows=128,
                           batch_size=64, progress=False))
    seen = np.concatenate([t.numpy() for t in helpers.SEEN_INPUTS[1:]])  # [0]: the dump's probe
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            m = json.loads(f.attrs["kdcache"])
            params, ids, logits, labels, digests = (f[k][:] for k in ("view_params", "sample_ids", "logits", "labels",
                                                                      "chunk_sha256"))
    else:
        g = zarr.open_group(out, mode="r")
        m = dict(g.attrs["kdcache"])
        params, ids, logits, labels, digests = (g[k][:] for k in ("view_params", "sample_ids", "logits", "labels",
                                                                  "chunk_sha256"))
    V, N, R = m["views"]["count"], m["num_samples"], m["chunk_rows"]
    S = N // V
    assert m["views"]["columns"] == ["jitter.shift_y", "jitter.shift_x", "flip.flip"] and (V, S) == (2, 300)
    np.testing.assert_array_equal(ids, np.tile(np.arange(300), 2))
    with np.load(Path(DATA_ROOT) / "mnist.npz") as f:
        images = f["x_test"][:300].astype(np.float32) / np.float32(255.0)
    for r in range(N):
        x = images[ids[r]]
        dy, dx, flip = (int(v) for v in params[r])
        H, W = x.shape
        view = np.zeros_like(x)
        ys, xs = np.arange(H) + dy, np.arange(W) + dx
        ok_y, ok_x = (ys >= 0) & (ys < H), (xs >= 0) & (xs < W)
        view[np.ix_(ok_y, ok_x)] = x[np.ix_(ys[ok_y], xs[ok_x])]
        if flip:
            view = view[:, ::-1]
        assert np.array_equal(view, seen[r]), f"row {r} (view {r // S}) does not replay"
    for k in range(len(digests)):
        a, b = k * R, min(k * R + R, N)
        d = hashlib.sha256(logits[a:b].tobytes() + params[a:b].tobytes() + ids[a:b].tobytes()
                           + labels[a:b].tobytes()).digest()
        assert bytes(digests[k]) == d
