"""The backup vault: incremental, deduplicated, compressed (zstd) and
optionally encrypted (AES-256-GCM) recovery points of managed disks."""

from .chunk import CHUNK, ChunkError
from .vault import BackupReport, Vault, VaultError, VaultKeyError

__all__ = ["CHUNK", "BackupReport", "ChunkError", "Vault", "VaultError", "VaultKeyError"]
