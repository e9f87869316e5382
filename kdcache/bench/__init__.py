"""``kdcache bench``: performance goals measured side by side in one run (``runner``), the profiles and
timer they share (``common``), and the object-storage benchmark against a loopback S3 endpoint
(``remote``). Nothing in the library imports this package."""
from kdcache.bench.common import BENCH_NAMES, FULL, QUICK, Profile
from kdcache.bench.runner import run_bench, topk_fidelity

__all__ = ["BENCH_NAMES", "FULL", "QUICK", "Profile", "run_bench", "topk_fidelity"]
