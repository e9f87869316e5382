"""``kdcache convert``: a complete store copied to another backend, dtype, codec or chunking, or a
dense store encoded into a sparse layout, block by block."""
from __future__ import annotations

from kdcache.errors import StoreError
from kdcache.layouts import encode_rows, layout_for
from kdcache.store import LogitStore, Manifest, create_store, default_chunk_rows, open_store


def convert_store(src: str, dst: str, dtype: str | None = None, fmt: str | None = None,
                  compression: str | None = None, overwrite: bool = False, chunk_rows: int | None = None, *,
                  layout: str | None = None, k: int | None = None, temperatures: list[float] | None = None,
                  samples: int | None = None, sampling_temperature: float | None = None, seed: int = 0,
                  **layout_options: object) -> LogitStore:
    """Copy a complete store to another backend, dtype or codec, or a store that keeps every logit
    (dense) to another layout, block by block. ``layout_options``: options of other registered layouts."""
    source = open_store(src)
    m = source.manifest
    d = m.to_dict()
    d.pop("created_at"), d.pop("kdcache_version")
    d.update(dtype=dtype or m.dtype, compression=compression or m.compression, complete=False)
    if layout and layout != m.layout:
        if not m.store_layout.keeps_every_logit:
            raise StoreError(f"{src} is a {m.layout} store; only a dense store can be converted to another layout")
        target_layout = layout_for(layout, m.num_classes, k=k, temperatures=temperatures, samples=samples,
                                   sampling_temperature=sampling_temperature, seed=seed, **layout_options)
        d.update(layout=target_layout.name, layout_params=target_layout.params())
    manifest = Manifest(**d)
    if chunk_rows or layout:
        manifest.chunk_rows = chunk_rows or (m.chunk_rows if manifest.layout == m.layout
                                             else default_chunk_rows(manifest.row_bytes(), m.num_samples))
    target = create_store(dst, manifest, fmt, overwrite=overwrite,
                          sequence_index=source.sequence_index() if m.per_token else None)
    if target.written_chunks().any():
        raise StoreError(f"{dst} holds a partial conversion; pass {{param:overwrite}} to start again")
    tm = target.manifest
    encode = tm.store_layout if tm.layout != m.layout else None
    raw = m.store_layout  # keeps every logit when encode is set: its targets are the raw logits
    step = max(tm.chunk_rows, (8 * m.chunk_rows) // tm.chunk_rows * tm.chunk_rows)
    for start in range(0, m.num_samples, step):
        blk = source.read(start, start + step)
        if encode is None:
            target.write_block(start, blk.data, blk.sample_ids, blk.labels)
            continue
        for a in range(0, len(blk), tm.chunk_rows):  # encode per target chunk: sampled draws are seeded by chunk
            part = blk.rows(slice(a, a + tm.chunk_rows))
            data = encode_rows(encode, (start + a) // tm.chunk_rows, raw.targets(part.data).numpy(),
                               tm.chunk_rows)
            if tm.views is not None:  # a store with views keeps each row's view parameters
                data = {**data, "view_params": part.data["view_params"]}
            target.write_block(start + a, data, part.sample_ids, part.labels)
    target.mark_complete()
    source.close()
    return target
