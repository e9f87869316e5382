"""Errors raised by kdcache. Only ``kdcache.cli`` turns them into a one-line message."""


class KdcacheError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it."""


class StoreError(KdcacheError):
    """A logit store is missing, malformed, incomplete or does not match its data."""


class SpecError(KdcacheError):
    """A model or dataset spec cannot be resolved."""


class ConfigError(KdcacheError):
    """A pipeline file or option combination is invalid."""
