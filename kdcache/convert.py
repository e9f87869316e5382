"""``kdcache convert``: a complete store copied to another backend, dtype, codec or chunking, or a
dense store encoded into a sparse layout, block by block."""
from __future__ import annotations

from kdcache.errors import StoreError
from kdcache.store import LogitStore, Manifest, create_store, default_chunk_rows, open_store


def convert_store(src: str, dst: str, dtype: str | None = None, fmt: str | None = None,
                  compression: str | None = None, overwrite: bool = False, chunk_rows: int | None = None, *,
                  layout: str | None = None, k: int | None = None, temperatures: list[float] | None = None,
                  samples: int | None = None, sampling_temperature: float = 1.0, seed: int = 0) -> LogitStore:
    """Copy a complete store to another backend, dtype or codec, or a dense store to a sparse layout,
    block by block."""
    from kdcache.dump import layout_encoder, layout_params
    source = open_store(src)
    m = source.manifest
    d = m.to_dict()
    d.pop("created_at"), d.pop("kdcache_version")
    d.update(dtype=dtype or m.dtype, compression=compression or m.compression, complete=False)
    if layout and layout != m.layout:
        if m.layout != "dense":
            raise StoreError(f"{src} is a {m.layout} store; only a dense store can be converted to another layout")
        d.update(layout=layout, layout_params=layout_params(layout, m.num_classes, k, temperatures, samples,
                                                            sampling_temperature, seed))
    manifest = Manifest(**d)
    if chunk_rows or layout:
        manifest.chunk_rows = chunk_rows or (m.chunk_rows if manifest.layout == m.layout
                                             else default_chunk_rows(manifest.row_bytes(), m.num_samples))
    target = create_store(dst, manifest, fmt, overwrite=overwrite,
                          sequence_index=source.sequence_index() if m.per_token else None)
    if target.written_chunks().any():
        raise StoreError(f"{dst} holds a partial conversion; pass --overwrite to start again")
    tm = target.manifest
    encode = layout_encoder(tm) if tm.layout != m.layout else None
    step = max(tm.chunk_rows, (8 * m.chunk_rows) // tm.chunk_rows * tm.chunk_rows)
    for start in range(0, m.num_samples, step):
        blk = source.read(start, start + step)
        if encode is None:
            target.write_block(start, blk.data, blk.sample_ids, blk.labels)
            continue
        for a in range(0, len(blk), tm.chunk_rows):  # encode per target chunk: sampled draws are seeded by chunk
            part = blk.rows(slice(a, a + tm.chunk_rows))
            data = encode((start + a) // tm.chunk_rows, part.logits)
            if tm.views is not None:  # a store with views keeps each row's view parameters
                data = {**(data if isinstance(data, dict) else {"logits": data}),
                        "view_params": part.data["view_params"]}
            target.write_block(start + a, data, part.sample_ids, part.labels)
    target.mark_complete()
    source.close()
    return target
