"""hostcache: the physical host in front of the stamp (BlobCache, throttles,
compute attach and boot). Not built yet: issue 4 builds it on `stamp` and
`vhd`. Nothing here is importable API until then."""

__all__: list[str] = []
