"""The vault's errors: every one is a StampError, so the `stamp` command prints
it as one line and exits 1."""

from __future__ import annotations

from ..errors import StampError


class VaultError(StampError):
    """A vault operation that cannot proceed (no vault, corrupt or tampered metadata, a refused request)."""


class VaultKeyError(VaultError):
    """The passphrase is missing, empty or wrong."""


class VaultLockedError(VaultError):
    """Another process holds a lock that conflicts with this operation (or left a stale one)."""


class ChunkError(VaultError):
    """A stored chunk that is not what its name says (corrupt, truncated, wrong key, missing)."""
