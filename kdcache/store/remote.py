"""Stores at fsspec URLs (``s3://bucket/path.zarr``, ``gs://``, ``memory://``): storage options, and
one line for what goes wrong far away (credentials, endpoint, bucket, network).

Options reach the filesystem the way fsspec users pass them: ``--storage-option KEY=VALUE`` on the
command line (``endpoint_url=http://127.0.0.1:9000``, ``anon=true``, ``key=...``), kept in the
environment variable ``KDCACHE_STORAGE_OPTIONS`` (JSON) so that torchrun workers and DataLoader
workers see them too; or the filesystem's own settings (for S3: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Iterable

from kdcache.errors import StoreError

ENV = "KDCACHE_STORAGE_OPTIONS"


def is_url(path: str) -> bool:
    return "://" in str(path)


def storage_options() -> dict[str, Any]:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError:
        raise StoreError(f"${ENV} is not JSON ({raw[:60]!r}); set it as '{{\"endpoint_url\": \"...\"}}' or use "
                         f"{{param:storage_option}} KEY=VALUE") from None
    if not isinstance(options, dict):
        raise StoreError(f"${ENV} must be a JSON object of storage options")
    return options


def set_storage_options(pairs: Iterable[str]) -> None:
    """Add ``KEY=VALUE`` pairs (values read as JSON where they parse: ``true``, ``3``, ``{...}``) to the
    options of every remote store this process and its children open."""
    options = storage_options()
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise StoreError(f"{pair!r}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
        if key.strip() in TIMEOUTS:
            _seconds(options[key.strip()], key.strip())
    if options:
        os.environ[ENV] = json.dumps(options)


# A request that gets no answer is abandoned after these many seconds, and tried again by s3fs (5 attempts
# in all, with a backoff of 0.1 to 0.8 s between them): a stalled network ends in an error within about
# S3_ATTEMPTS * (connect + read) seconds, a minute with the defaults, instead of botocore's minutes.
TIMEOUTS = {"connect_timeout": 4.0, "read_timeout": 8.0}
S3_ATTEMPTS = 5


def is_s3(path: str) -> bool:
    return str(path).startswith(("s3://", "s3a://"))


def fs_options(path: str) -> dict[str, Any]:
    """The fsspec options of ``path``: the user's (see :func:`storage_options`) and, for ``s3://``, the
    timeouts (``connect_timeout``, ``read_timeout`` in seconds; from the options, else
    ``KDCACHE_S3_CONNECT_TIMEOUT`` / ``KDCACHE_S3_READ_TIMEOUT``, else TIMEOUTS) as botocore's config,
    with botocore's own retries off so that s3fs's are the only ones (one bound, one notice)."""
    options = storage_options()
    if not is_s3(path):
        return options
    config = dict(options.pop("config_kwargs", None) or {})
    for key, default in TIMEOUTS.items():
        env = f"KDCACHE_S3_{key.upper()}"
        raw = options.pop(key, os.environ.get(env, default))
        config.setdefault(key, _seconds(raw, key if key in storage_options() else env if env in os.environ else key))
    config.setdefault("retries", {"total_max_attempts": 1})
    return {**options, "config_kwargs": config}


def _seconds(raw: Any, name: str) -> float:
    try:
        value = float("nan") if isinstance(raw, bool) else float(raw)  # `true` is not a number of seconds
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise StoreError(f"{name}={raw!r}: a timeout is a number of seconds above 0, e.g. "
                         f"{{param:storage_option}} {name.lower().replace('kdcache_s3_', '')}=10")
    return value


def stall_bound(path: str) -> float:
    """Seconds after which a request to ``path`` that gets no answer has failed for good (about)."""
    c = fs_options(path).get("config_kwargs", {})
    return S3_ATTEMPTS * (c.get("connect_timeout", 0) + c.get("read_timeout", 0)) + 2


def bound_calls(path: str) -> None:
    """Note that this process talks to a remote store: its event loops are drained before exit. A request
    that the network swallows (a half-open connection, a dead load balancer) can wait in a connection
    pool beyond any socket timeout, so each call is also given a deadline (:func:`bounded`)."""
    global _REMOTE_USED
    _REMOTE_USED = True


_REMOTE_USED = False


def bounded(path: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a call that talks to the store at ``path``, given :func:`stall_bound` seconds: past
    them it raises TimeoutError (its requests are left to :func:`drain_event_loops`). Run in a daemon
    thread, so a call the network swallowed can never keep the process from exiting."""
    if not is_s3(path):
        return fn(*args)
    import threading
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller
            box.append((False, e))
        done.set()
    threading.Thread(target=run, daemon=True, name="kdcache-remote").start()
    limit = stall_bound(path)
    if not done.wait(limit):
        raise TimeoutError(f"no answer from the object store within {limit:.0f} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def drain_event_loops(timeout: float = 5.0) -> None:
    """Cancel and wait out the requests still in flight on fsspec's and zarr's event loops (after an
    error far away, some are): left pending, they are destroyed at interpreter exit, each printing
    "Task was destroyed but it is pending!" or "Event loop is closed" after kdcache's one-line error."""
    if not _REMOTE_USED:
        return
    import asyncio
    loops = []
    try:
        import fsspec.asyn
        loops.append(fsspec.asyn.loop[0])
    except (ImportError, AttributeError, IndexError):
        pass
    try:
        import zarr.core.sync
        loops.append(zarr.core.sync.loop[0])
    except (ImportError, AttributeError, IndexError):
        pass
    for loop in loops:
        if loop is None or loop.is_closed() or not loop.is_running():
            continue
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(timeout), loop).result(timeout + 1)
        except Exception:  # a loop that cannot be drained in time: exit regardless
            pass


async def _cancel_all(timeout: float) -> None:
    import asyncio
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


def url_fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path within it; a missing filesystem package is a user
    error, not a crash."""
    import fsspec
    try:
        fs, inner = fsspec.core.url_to_fs(path, **fs_options(path))
    except (ImportError, ValueError, TypeError) as e:
        raise StoreError(f"cannot open {path!r}: {e} (for s3:// pip install 'kdcache[s3]'; gcsfs for gs://)") from None
    _quiet_lost_requests()
    watch_retries(path)
    bound_calls(path)
    return fs, inner


def endpoint(path: str) -> str:
    return (storage_options().get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint")


def watch_retries(path: str) -> None:
    """Say once, in one line, that requests to the object store are being retried (s3fs retries
    quietly: without this a stalled network looks like a hang)."""
    log = logging.getLogger("s3fs")
    if any(isinstance(h, _RetryNotice) for h in log.handlers):
        return
    log.addHandler(_RetryNotice(path))
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)


class _RetryNotice(logging.Handler):
    def __init__(self, path: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.path, self.said = path, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.said or not str(record.msg).startswith("Retryable error"):
            return
        self.said = True
        why = str(record.args[0]).splitlines()[0] if record.args else "no answer"
        print(f"note: the object store at {endpoint(self.path)} did not answer ({why[:120]}); retrying for up to "
              f"about {stall_bound(self.path):.0f} s", file=sys.stderr, flush=True)


def _quiet_lost_requests() -> None:
    """When the endpoint goes away mid-write, requests still in flight on the event loops of fsspec
    and zarr fail after the error that kdcache reports in one line; asyncio would then log each of
    them as "Task exception was never retrieved" with a traceback. Those records (connection errors
    only) are dropped from the ``asyncio`` logger; anything else it logs is left alone."""
    import logging
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _LostRequests) for f in log.filters):
        log.addFilter(_LostRequests())


class _LostRequests:
    def filter(self, record: Any) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        lost = "never retrieved" in str(record.msg) and (
            isinstance(exc, OSError) or type(exc).__module__.startswith(("aiohttp", "aiobotocore", "botocore")))
        return not lost


def remote_problem(path: str, e: BaseException) -> str | None:
    """What a failure talking to object storage means, in a few words with the fix; None when ``e``
    is not such a failure (nor is anything for a local path)."""
    if not is_url(path):
        return None
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    names = {type(x).__name__ for x in seen}
    text = " ".join(str(x) for x in seen)
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return (f"no credentials for {path}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                f"--storage-option anon=true for a public bucket")
    if "PermissionError" in names or any(code in text for code in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "InvalidToken",
            "ExpiredToken")):
        return (f"access to {path} was refused (wrong or expired credentials, or no permission): check "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile, and the bucket's policy")
    if "NoSuchBucket" in text or "specified bucket does not exist" in text:
        return f"bucket {bucket!r} does not exist at this endpoint: create it, or check the URL and endpoint_url"
    if "no answer from the object store within" in text:
        limit = text.split("no answer from the object store within ", 1)[1].split(" s", 1)[0]
        return (f"the object store for {path} at {endpoint(path)} did not answer within {limit} s (a stalled "
                f"network, proxy or load balancer): check the network; --storage-option read_timeout=SECONDS "
                f"sets how long a request may wait")
    if names & {"ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "TimeoutError"}:
        c = fs_options(path).get("config_kwargs", {})
        return (f"the object store for {path} at {endpoint(path)} stopped answering (requests timed out after "
                f"{c.get('connect_timeout', '?')} s to connect, {c.get('read_timeout', '?')} s to read, retried: a "
                f"stalled network, proxy or load balancer): check the network; --storage-option "
                f"read_timeout=SECONDS sets how long a request may wait")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError", "ReadTimeoutError", "ConnectionClosedError", "ClientOSError",
                "ConnectionError", "ClientConnectionError", "TimeoutError"}:
        return (f"cannot reach the object store for {path} at {endpoint(path)}: check the network and endpoint_url "
                f"(--storage-option endpoint_url=... or AWS_ENDPOINT_URL)")
    return None
