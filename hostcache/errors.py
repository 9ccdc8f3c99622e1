"""The host's errors: a request the platform would refuse, or a bad setting."""

from __future__ import annotations


class HostError(Exception):
    """Base class for everything hostcache raises on purpose."""


class UnknownTier(HostError):
    """No published tier or VM size matches the request."""


class InvalidPerformance(HostError):
    """Provisioned IOPS or MB/s outside what the disk type allows for its size."""
