"""What ``kdcache inspect`` and ``convert`` compute, streaming over a store's blocks."""
from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.errors import StoreError
from kdcache.store import LogitStore, Manifest, create_store, open_store

ENTROPY_TEMPERATURES = (1.0, 2.0, 4.0, 10.0, 20.0)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def inspect_store(path: str, fmt: str | None = None, allow_partial: bool = True) -> dict[str, Any]:
    """Manifest, size and statistics computed from the stored logits (written chunks only)."""
    store = open_store(path, fmt, allow_partial=allow_partial)
    m = store.manifest
    M = m.num_members
    written = store.written_chunks()
    correct = np.zeros(M + 1, np.int64)
    labelled = rows = 0
    entropy = np.zeros(len(ENTROPY_TEMPERATURES))
    agree = np.zeros((M, M), np.int64)
    all_agree = 0
    for block in store.iter_blocks():
        first = block.start // m.chunk_rows
        keep = np.repeat(written[first:first + -(-len(block.logits) // m.chunk_rows)], m.chunk_rows)[:len(block.logits)]
        z = block.logits[keep].astype(np.float32)
        y = block.labels[keep]
        if not len(z):
            continue
        rows += len(z)
        top = z.argmax(-1)  # [rows, members]
        for ti, t in enumerate(ENTROPY_TEMPERATURES):
            logp = _log_softmax(z / t)
            mean_p = np.exp(logp).mean(1)
            entropy[ti] += float(-(mean_p * np.log(np.clip(mean_p, 1e-30, None))).sum(-1).sum())
            if t == 1.0:
                ens_top = mean_p.argmax(-1)
        has = y >= 0
        labelled += int(has.sum())
        correct[:M] += (top[has] == y[has, None]).sum(0)
        correct[M] += int((ens_top[has] == y[has]).sum())
        agree += (top[:, :, None] == top[:, None, :]).sum(0)
        all_agree += int((top == top[:, :1]).all(1).sum())
    info: dict[str, Any] = {
        **{k: v for k, v in m.to_dict().items()},
        "path": store.path, "backend": store.format,
        "shape": [m.num_samples, M, m.num_classes],
        "bytes_on_disk": store.nbytes_on_disk(),
        "bytes_per_sample": store.nbytes_on_disk() / m.num_samples,
        "chunks_written": int(written.sum()), "num_chunks": m.num_chunks,
        "rows_inspected": rows,
        "accuracy": None, "mean_entropy": None, "member_agreement": None,
    }
    if labelled:
        info["accuracy"] = {"members": [float(c / labelled) for c in correct[:M]],
                            "ensemble_mean_prob": float(correct[M] / labelled), "labelled_rows": labelled}
    if rows:
        info["mean_entropy"] = {f"T={t:g}": float(e / rows) for t, e in zip(ENTROPY_TEMPERATURES, entropy)}
        info["member_agreement"] = {"all": all_agree / rows, "pairwise": (agree / rows).round(6).tolist()}
    store.close()
    return info


def format_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']} ({info['backend']}, format v{info['format_version']}, layout {info['layout']})",
        f"  logits      {info['shape'][0]} samples x {info['shape'][1]} members x {info['shape'][2]} classes, "
        f"{info['dtype']}, chunks of {info['chunk_rows']} rows, compression {info['compression']}",
        f"  on disk     {info['bytes_on_disk'] / 1e6:.2f} MB ({info['bytes_per_sample']:.1f} bytes/sample)",
        f"  complete    {info['complete']} ({info['chunks_written']}/{info['num_chunks']} chunks written)",
        f"  dataset     {info['dataset']['spec']} (length {info['dataset']['length']}, subset "
        f"{info['dataset'].get('subset') or 'all rows'}, fingerprint {info['dataset']['fingerprint'][:16]})",
        f"  created     {info['created_at']} by kdcache {info['kdcache_version']}",
    ]
    for mem in info["members"]:
        lines.append(f"  member      {mem['name']}  spec {mem['spec']}  sha256 {mem['sha256'][:16]}")
    acc = info.get("accuracy")
    if acc:
        per = ", ".join(f"{a:.4f}" for a in acc["members"])
        lines.append(f"  accuracy    ensemble {acc['ensemble_mean_prob']:.4f}; members {per} "
                     f"({acc['labelled_rows']} labelled rows)")
    if info.get("mean_entropy"):
        lines.append("  entropy     " + ", ".join(f"{k} {v:.3f}" for k, v in info["mean_entropy"].items())
                     + " nats (ensemble mean of softmax(z/T))")
    if info.get("member_agreement") and info["num_members"] > 1:
        lines.append(f"  agreement   all members agree on {info['member_agreement']['all']:.4f} of rows")
    return "\n".join(lines)


def convert_store(src: str, dst: str, dtype: str | None = None, fmt: str | None = None,
                  compression: str | None = None, overwrite: bool = False,
                  chunk_rows: int | None = None) -> LogitStore:
    """Copy a complete store to another backend, dtype or codec, block by block."""
    source = open_store(src)
    m = source.manifest
    d = m.to_dict()
    d.update(dtype=dtype or m.dtype, compression=compression or m.compression,
             chunk_rows=chunk_rows or m.chunk_rows, complete=False)
    d.pop("created_at"), d.pop("kdcache_version")
    target = create_store(dst, Manifest(**d), fmt, overwrite=overwrite)
    if target.written_chunks().any():
        raise StoreError(f"{dst} holds a partial conversion; pass --overwrite to start again")
    tm = target.manifest
    step = max(tm.chunk_rows, (8 * m.chunk_rows) // tm.chunk_rows * tm.chunk_rows)
    for start in range(0, m.num_samples, step):
        blk = source.read(start, start + step)
        target.write_block(start, blk.logits, blk.sample_ids, blk.labels)
    target.mark_complete()
    source.close()
    return target
