"""The backup vault: incremental, deduplicated, compressed (zstd) and
optionally encrypted (AES-256-GCM) recovery points of managed disks, with
locks, authenticated metadata and an index rebuilt from the manifests."""

from .chunk import CHUNK
from .errors import ChunkError, VaultError, VaultKeyError, VaultLockedError
from .vault import BackupReport, Vault

__all__ = ["CHUNK", "BackupReport", "ChunkError", "Vault", "VaultError", "VaultKeyError", "VaultLockedError"]
