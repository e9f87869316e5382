"""``kdcache bench --only s3``: stores in object storage against the same stores on local disk.

The endpoint is a real S3 server on the loopback interface (moto's, in a child process; see
:mod:`kdcache.testing.s3_loopback`), reached over HTTP through s3fs, so every read and write pays a request's
round trip, as it would far away (with less latency than a real region: the ratios here are an upper
bound of what read-ahead has to hide).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kdcache.bench.common import Profile, interleave_all


@contextlib.contextmanager
def _endpoint() -> Iterator[Any]:
    """A loopback S3 server with a bucket, and this process's environment pointed at it."""
    import s3fs

    from kdcache.testing.s3_loopback import LoopbackS3
    with LoopbackS3() as s3:
        s3.make_bucket("kdcache-bench")
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield s3
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_store(path: str, rows: int, classes: int) -> None:
    from kdcache.store import Manifest, create_store
    rng = np.random.default_rng(0)
    m = Manifest(num_samples=rows, num_classes=classes, num_members=1, dtype="float16", chunk_rows=4096,
                 compression="none", members=[{"name": "bench", "spec": "bench", "sha256": "0" * 64}],
                 dataset={"spec": "bench", "name": "bench", "split": None, "length": rows, "fingerprint": "0",
                          "subset": None})
    s = create_store(path, m, overwrite=True)
    step = m.chunk_rows * 8
    for a in range(0, rows, step):
        b = min(a + step, rows)
        s.write_block(a, rng.standard_normal((b - a, 1, classes), dtype=np.float32).astype(np.float16),
                      np.arange(a, b), rng.integers(0, classes, b - a))
    s.mark_complete()
    s.close()


def bench_s3(p: Profile, work: Path, device: str) -> dict[str, Any]:
    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        return {"skipped": f"needs s3fs and moto[server] ({e.name} is missing): pip install 'kdcache[s3,test]'"}
    from kdcache.dump import DumpConfig, dump_logits
    from kdcache.store import open_store
    from kdcache.store.block_cache import BlockCache
    from kdcache.stream import DistillStream
    out: dict[str, Any] = {"rows": p.read_rows, "classes": p.read_classes}
    with _endpoint() as s3:
        local, remote = str(work / "s3-bench.zarr"), "s3://kdcache-bench/stream.zarr"
        _write_store(local, p.read_rows, p.read_classes)
        _write_store(remote, p.read_rows, p.read_classes)
        out["store_MB"] = open_store(local).nbytes_on_disk() / 1e6
        cache = BlockCache(work / "s3-block-cache", "1GB")
        streams = {
            "local": DistillStream(local, None, batch_size=1024),
            "s3_in_line": DistillStream(remote, None, batch_size=1024, read_ahead=0),
            "s3_read_ahead": DistillStream(remote, None, batch_size=1024),
            "s3_cached": DistillStream(remote, None, batch_size=1024, cache=cache),
        }

        cpu = {k: [0.0, 0.0, 0.0] for k in streams}  # the server's and this process's CPU seconds, wall seconds

        def epoch(name: str, stream: DistillStream) -> Any:
            def run() -> None:
                stream.set_epoch(stream.epoch + 1)  # a new shuffle every time, as epochs are
                server, me, t = _cpu_seconds(s3.proc.pid), time.process_time(), time.perf_counter()
                for _ in stream:
                    pass
                c = cpu[name]
                c[0] += _cpu_seconds(s3.proc.pid) - server
                c[1] += time.process_time() - me
                c[2] += time.perf_counter() - t
            return run

        # the warm-up pass of each side is its first epoch: it fills the cache
        times = dict(zip(streams, interleave_all([epoch(k, s) for k, s in streams.items()], p.reps)))
        out["stream_s"] = times
        # on a machine of few cores the endpoint and the client share them: "cores busy" near the core count
        # means the stream is bound by the CPU cost of each request, which reading ahead cannot hide
        out["stream"] = [{"side": k, "seconds": v, "rows_per_s": p.read_rows / v,
                          "s3_over_local_throughput": times["local"] / v if k != "local" else 1.0,
                          "server_cpu_s": cpu[k][0] / (p.reps + 1), "client_cpu_s": cpu[k][1] / (p.reps + 1),
                          "cores_busy": (cpu[k][0] + cpu[k][1]) / cpu[k][2],
                          "goal": {"s3_read_ahead": ">= 0.5", "s3_cached": ">= 0.9 (epochs after the first)"}.get(k)}
                         for k, v in times.items()]
        out["cache"] = {"hits": cache.hits, "misses": cache.misses, "MB": cache.nbytes() / 1e6}

        rows = p.dump_rows
        sides = {}
        for name, target in (("local", str(work / "dump-local.zarr")), ("s3", "s3://kdcache-bench/dump.zarr")):
            cfg = DumpConfig(teachers=["mlp:1200,1200"], dataset="mnist:train", out=target, subset=f"0:{rows}",
                             overwrite=True, device=device, progress=False)
            sides[name] = (lambda c=cfg: dump_logits(c))
        t_local, t_s3 = interleave_all(list(sides.values()), p.reps)
        out["dump"] = {"teacher": "mlp:1200,1200", "rows": rows, "local_s": t_local, "s3_s": t_s3,
                       "s3_over_local": t_s3 / t_local, "goal": "<= 1.2"}
    return out
