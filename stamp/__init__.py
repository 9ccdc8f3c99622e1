"""stamp: the storage stamp (stream layer of replicated extents, partition
layer of page blobs, managed disks, vault). Not built yet: issue 3 builds it
on top of `vhd`. Nothing here is importable API until then."""

__all__: list[str] = []
