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


def test_token_windows_and_every_identity_hash_recompute_from_the_document(tmp_path):
    """From FORMAT.md alone, with numpy, json, hashlib, the tokenizer and safetensors (torch only for
    the sampled layout's generator): the hf-text windows, the tokenizer's sha256, the fingerprint of a
    sequence dataset, the weights sha256 of an hf: teacher, the sampled draws, and portable names."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.numpy import load_file

    from tests.conftest import ROOT
    from tests.test_hf import _save_model
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20][:40]
    corpus = tmp_path / "data" / "chat.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    teacher = _save_model(tmp_path / "models" / "teacher", texts, 300)
    spec = f"hf-text:{corpus},seq=16"
    common = ["--teacher", f"hf:{teacher}", "--dataset", spec, "--dtype", "float32", "--chunk-rows", "64",
              "--batch-size", "8"]
    dense, sampled = str(tmp_path / "stores" / "dense.zarr"), str(tmp_path / "stores" / "sampled.zarr")
    run_kdcache("dump-logits", *common, "--out", dense)
    run_kdcache("dump-logits", *common, "--layout", "sampled", "--samples", "6", "--sampling-temperature", "2",
                "--temperatures", "1,2", "--out", sampled)
    g = zarr.open_group(dense, mode="r")
    m = dict(g.attrs["kdcache"])
    # portable names: paths relative to the store's directory, the tokenizer by its name
    assert m["dataset"]["spec"] == "hf-text:../data/chat.jsonl,seq=16,tokenizer=../models/teacher"
    assert m["dataset"]["tokenizer"]["name"] == "teacher" and str(tmp_path) not in json.dumps(m)

    tok = transformers.AutoTokenizer.from_pretrained(str(teacher))
    vocab = [[t, i] for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    body = json.dumps({"vocab": vocab, "special": tok.special_tokens_map}, sort_keys=True, separators=(",", ":"))
    assert m["dataset"]["tokenizer"]["sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert m["dataset"]["tokenizer"]["size"] == len(tok)

    seq = 16
    windows = []
    for t in tok(texts, add_special_tokens=True)["input_ids"]:
        windows += [t[a:a + seq + 1] for a in range(0, max(len(t) - 1, 0), seq)]
    windows = [np.array(w, dtype=np.int64) for w in windows if len(w) >= 2]
    seq_ids, offsets, labels = g["sequence_ids"][:], g["sequence_offsets"][:], g["labels"][:]
    assert m["dataset"]["length"] == len(windows) and len(seq_ids) == len(windows)
    for i, s in enumerate(seq_ids):
        np.testing.assert_array_equal(labels[offsets[i]:offsets[i + 1]], windows[s][1:])

    n = len(windows)
    idx = np.unique(np.linspace(0, n - 1, min(n, 256)).round().astype(np.int64))
    width = max(len(windows[i]) - 1 for i in idx)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = np.full((len(idx), width), pad, dtype=np.int64)
    y = np.full((len(idx), width), -1, dtype=np.int64)
    for r, i in enumerate(idx):
        w = windows[i]
        x[r, :len(w) - 1], y[r, :len(w) - 1] = w[:-1], w[1:]
    h = hashlib.sha256(f"kdcache-fingerprint-1;n={n}".encode())
    h.update(f";torch.int64;{(width,)}".encode())
    h.update(x.tobytes() + y.tobytes())
    assert m["dataset"]["fingerprint"] == h.hexdigest()

    weights = load_file(str(teacher / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(f"model.{k}" for k in weights):
        a = np.ascontiguousarray(weights[k[len("model."):]])
        h.update(f"{k};torch.{a.dtype};{tuple(a.shape)};".encode() + a.tobytes())
    assert m["members"][0]["sha256"] == h.hexdigest()

    s = zarr.open_group(sampled, mode="r")
    sm = dict(s.attrs["kdcache"])
    p, R, N = sm["layout_params"], sm["chunk_rows"], sm["num_samples"]
    z_all = g["logits"][:]
    ids, counts, values = s["sampled_ids"][:], s["sampled_counts"][:], s["sampled_values"][:]
    for c in range(-(-N // R)):
        a, b = c * R, min(c * R + R, N)
        gen = torch.Generator().manual_seed(p["seed"] * 1000003 + c)
        z = torch.from_numpy(z_all[a:b].astype(np.float32))
        probs = torch.softmax(z / p["sampling_temperature"], dim=-1).reshape(-1, z.shape[-1])
        draws = torch.multinomial(probs, p["samples"], replacement=True, generator=gen).sort(dim=-1).values.numpy()
        want_ids = np.full((len(draws), p["samples"]), -1, dtype=np.int32)
        want_counts = np.zeros_like(want_ids)
        for line, d in enumerate(draws):
            u, cnt = np.unique(d, return_counts=True)
            want_ids[line, :len(u)], want_counts[line, :len(u)] = u, cnt
        np.testing.assert_array_equal(ids[a:b].reshape(-1, p["samples"]), want_ids)
        np.testing.assert_array_equal(counts[a:b].reshape(-1, p["samples"]), want_counts)
        zz = z.reshape(-1, z.shape[-1]).numpy()
        want_values = np.where(want_ids >= 0, np.take_along_axis(zz, np.maximum(want_ids, 0), 1), 0)
        np.testing.assert_array_equal(values[a:b].reshape(-1, p["samples"]), want_values)


def test_image_fingerprint_listing_and_a_view_recompute_from_the_document(tmp_path):
    """From FORMAT.md alone, with os, hashlib, numpy and Pillow: an image folder's listing, groups, sampled
    digests and fingerprint, and a view cut from an original image (the box), as the manifest says."""
    pytest.importorskip("torchvision")
    import hashlib
    import math
    import os

    from PIL import Image

    from kdcache.dump import DumpConfig, dump_logits
    from kdcache.vision.synth import render_digits
    from tests.conftest import DATA_ROOT
    root = render_digits(tmp_path / "digits", 3, "test", 20, 60, seed=1, data_root=DATA_ROOT)
    out = str(tmp_path / "s.zarr")
    dump_logits(DumpConfig(teachers=["tests.helpers:rgb_teacher"], dataset=f"imagefolder:{root},size=12", out=out,
                           augment="resized-crop:0.3+flip", views=2, dtype="float32", progress=False))
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(out, mode="r")
    m = g.attrs["kdcache"]
    exts = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
    entries, paths = [], []
    for label, cls in enumerate(sorted(e.name for e in os.scandir(root) if e.is_dir())):
        files = []
        for dirpath, _, names in os.walk(root / cls):
            files += [os.path.relpath(os.path.join(dirpath, f), root / cls) for f in names if f.lower().endswith(exts)]
        for f in sorted(files):
            p = root / cls / f
            paths.append(p)
            entries.append(f"{cls}/{f}\0{p.stat().st_size}\0{label}\n".encode())
    n = len(entries)
    listing = hashlib.sha256(f"kdcache-images-1;n={n};labelled=1".encode() + b"".join(entries)).hexdigest()
    group = math.ceil(n / 4096)
    groups = [hashlib.sha256(b"".join(entries[a:a + group])).hexdigest()[:16] for a in range(0, n, group)]
    picks = np.unique(np.linspace(0, n - 1, min(n, 256)).round().astype(np.int64))
    sampled = [hashlib.sha256(paths[i].read_bytes()).hexdigest()[:16] for i in picks]
    files = m["dataset"]["files"]
    assert (files["listing_sha256"], files["group_size"], files["groups"], files["sampled"]) == (
        listing, group, groups, sampled)
    fp = hashlib.sha256(f"kdcache-images-1;{listing};{','.join(sampled)}".encode()).hexdigest()
    assert m["dataset"]["fingerprint"] == fp and m["views"]["originals"] is True
    ids, params = g["sample_ids"][:], g["view_params"][:]
    for r in range(0, len(ids), 7):  # each box lies in its original image; the flip flag is 0 or 1
        with Image.open(paths[ids[r]]) as im:
            w, h = im.size
        top, left, bh, bw, flip = params[r]
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and flip in (0.0, 1.0)
