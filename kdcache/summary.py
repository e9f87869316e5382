"""What ``kdcache inspect`` computes, streaming over a store's blocks."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from kdcache.store import open_store


def inspect_store(path: str, fmt: str | None = None, allow_partial: bool = True) -> dict[str, Any]:
    """Manifest, size and statistics computed from the stored logits (written chunks only)."""
    store = open_store(path, fmt, allow_partial=allow_partial)
    m = store.manifest
    M = m.num_members
    written = store.written_chunks()
    layout = m.store_layout
    correct = np.zeros(M + 1, np.int64)
    labelled = rows = 0
    sums: dict[str, np.ndarray] = {}
    agree = np.zeros((M, M), np.int64)
    all_agree = 0
    # the ensemble's prediction where the rows give it exactly: every logit kept, or one member
    exact_ensemble = layout.keeps_every_logit or M == 1
    for block in store.iter_blocks():
        first = block.start // m.chunk_rows
        keep = np.repeat(written[first:first + -(-len(block) // m.chunk_rows)], m.chunk_rows)[:len(block)]
        part = block.rows(keep)
        y = part.labels
        if not len(y):
            continue
        rows += len(y)
        data = {k: part.data[k] for k in m.logit_arrays}
        top = layout.top1(data)  # [rows, members]
        ens_top = layout.ensemble_top1(data) if exact_ensemble else np.full(len(y), -1)
        for name, v in layout.statistics(data).items():
            sums[name] = sums.get(name, 0) + v
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
        "accuracy": None, "mean_entropy": None, "mean_tail_mass": None, "member_agreement": None,
    }
    if labelled:
        info["accuracy"] = {"members": [float(c / labelled) for c in correct[:M]],
                            "ensemble_mean_prob": float(correct[M] / labelled), "labelled_rows": labelled}
    if labelled and not exact_ensemble:
        info["accuracy"]["ensemble_mean_prob"] = None  # needs every member's full distribution
    for name, labels in layout.statistic_labels().items():
        if rows:
            info[name] = {label: float(v / rows) for label, v in zip(labels, sums[name])}
    if rows:
        info["member_agreement"] = {"all": all_agree / rows, "pairwise": (agree / rows).round(6).tolist()}
    store.close()
    return info


def _preprocess(p: dict[str, Any]) -> str:
    return (f"size {p['size']}, {p['interpolation']}, crop_pct {p['crop_pct']}, mean {'/'.join(map(str, p['mean']))}, "
            f"std {'/'.join(map(str, p['std']))}")


def _row_kind(dataset: dict[str, Any]) -> str:
    """What a per-token store's rows are: every position, or (hf-chat rows=assistant) some of them."""
    chat = dataset.get("chat")
    return "position whose target is an assistant token" if chat and chat["rows"] == "assistant" else "position"


def format_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']} ({info['backend']}, format v{info['format_version']}, layout {info['layout']})",
        f"  logits      {info['shape'][0]} "
        f"{'positions' if info.get('sequences') else 'rows' if info.get('views') else 'samples'} x "
        f"{info['shape'][1]} members x {info['shape'][2]} classes, "
        f"{info['dtype']}, chunks of {info['chunk_rows']} rows, compression {info['compression']}",
        *([f"  layout      {info['layout']} {json.dumps(info['layout_params'])}"] if info["layout_params"] else []),
        *([f"  views       {info['views']['count']} per sample ({info['shape'][0] // info['views']['count']} samples), "
           f"augment {info['views']['augment']}, seed {info['views']['seed']}, parameters "
           f"{', '.join(info['views']['columns'])}"
           + (", cut from the original images" if info['views'].get("originals") else "")]
          if info.get("views") else []),
        *([f"  skipped     {len(info['skipped'])} unreadable inputs (sample ids "
           f"{', '.join(map(str, info['skipped'][:10]))}{' ...' if len(info['skipped']) > 10 else ''}), "
           f"never trained on"] if info.get("skipped") else []),
        *([f"  classes     {', '.join(info['class_names'][:20])}{' ...' if len(info['class_names']) > 20 else ''} "
           f"({len(info['class_names'])})"] if info.get("class_names") else []),
        *([f"  images      {info['dataset']['files']['count']} files, preprocessing "
           f"{_preprocess(info['dataset']['preprocess'])}"] if info["dataset"].get("preprocess") else []),
        *([f"  sequences   {info['sequences']['count']} (a row per {_row_kind(info['dataset'])}, up to "
           f"{info['sequences']['max_length']} each, padding not stored)"] if info.get("sequences") else []),
        *([f"  chat        rows={chat['rows']}, rule {chat['rule']}, template sha256 {chat['template_sha256'][:16]}; "
           f"records skipped {sum(chat['skipped'].values())}, truncated {chat['truncated']}"]
          if (chat := info["dataset"].get("chat")) else []),
        f"  on disk     {info['bytes_on_disk'] / 1e6:.2f} MB ({info['bytes_per_sample']:.1f} bytes/row)",
        f"  complete    {info['complete']} ({info['chunks_written']}/{info['num_chunks']} chunks written)",
        f"  dataset     {info['dataset']['spec']} (length {info['dataset']['length']}, subset "
        f"{info['dataset'].get('subset') or 'all rows'}, fingerprint {info['dataset']['fingerprint'][:16]})",
        *([f"  tokenizer   {info['dataset']['tokenizer']['name']} ({info['dataset']['tokenizer']['size']} tokens, "
           f"sha256 {info['dataset']['tokenizer']['sha256'][:16]})"] if info['dataset'].get("tokenizer") else []),
        f"  created     {info['created_at']} by kdcache {info['kdcache_version']}",
    ]
    for mem in info["members"]:
        lines.append(f"  member      {mem['name']}  spec {mem['spec']}  sha256 {mem['sha256'][:16]}")
    acc = info.get("accuracy")
    if acc:
        per = ", ".join(f"{a:.4f}" for a in acc["members"])
        ens = acc["ensemble_mean_prob"]
        lines.append(f"  accuracy    ensemble {'-' if ens is None else format(ens, '.4f')}; members {per} "
                     f"({acc['labelled_rows']} labelled rows)")
    if info.get("mean_tail_mass"):
        lines.append("  tail mass   " + ", ".join(f"{k} {v:.4f}" for k, v in info["mean_tail_mass"].items())
                     + " (mean probability outside the kept top-k)")
    if info.get("mean_entropy"):
        lines.append("  entropy     " + ", ".join(f"{k} {v:.3f}" for k, v in info["mean_entropy"].items())
                     + " nats (ensemble mean of softmax(z/T))")
    if info.get("member_agreement") and info["num_members"] > 1:
        lines.append(f"  agreement   all members agree on {info['member_agreement']['all']:.4f} of rows")
    return "\n".join(lines)
