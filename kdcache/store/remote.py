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
import os
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
                         f"--storage-option KEY=VALUE") from None
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
    if options:
        os.environ[ENV] = json.dumps(options)


def url_fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path within it; a missing filesystem package is a user
    error, not a crash."""
    import fsspec
    try:
        fs, inner = fsspec.core.url_to_fs(path, **storage_options())
    except (ImportError, ValueError, TypeError) as e:
        raise StoreError(f"cannot open {path!r}: {e} (for s3:// pip install 'kdcache[s3]'; gcsfs for gs://)") from None
    _quiet_lost_requests()
    return fs, inner


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
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "InvalidToken", "ExpiredToken")):
        return (f"access to {path} was refused (wrong or expired credentials, or no permission): check "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile, and the bucket's policy")
    if "NoSuchBucket" in text or "specified bucket does not exist" in text:
        return f"bucket {bucket!r} does not exist at this endpoint: create it, or check the URL and endpoint_url"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError", "ReadTimeoutError", "ConnectionClosedError", "ClientOSError",
                "ConnectionError", "ClientConnectionError", "TimeoutError"}:
        endpoint = storage_options().get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        return (f"cannot reach the object store for {path} at {endpoint}: check the network and endpoint_url "
                f"(--storage-option endpoint_url=... or AWS_ENDPOINT_URL)")
    return None
