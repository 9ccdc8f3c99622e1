"""Last-Modified over REST moves with every change of a blob's pages or size,
whichever path made it: the endpoint, or a host writing through the stamp's
Python API (PageBlobs.write, clear, resize), and If-Modified-Since sees it."""

from __future__ import annotations

import time

import pytest
from azure.core.exceptions import ResourceModifiedError, ResourceNotModifiedError

from stamp import Stamp


@pytest.fixture
def blob(server, request):
    name = request.node.name.replace("_", "-").lower()[:50].strip("-")
    cc = server.service().create_container(name)
    b = cc.get_blob_client("lm")
    b.create_page_blob(64 * 1024)
    yield b
    cc.delete_container()


def _next_second() -> None:
    """Sleep past the next whole second (an HTTP date's precision)."""
    time.sleep(1.05 - time.time() % 1)


@pytest.mark.parametrize("change", ["write", "clear", "resize"])
def test_a_change_through_the_python_api_moves_last_modified(server, blob, change):
    if change == "clear":
        blob.upload_page(b"x" * 512, offset=0, length=512)
    before = blob.get_blob_properties()
    _next_second()
    with Stamp.open(server.stamp) as st:
        name = f"{blob.container_name}/{blob.blob_name}"
        if change == "write":
            st.blobs.write(name, 4096, b"y" * 512)
        elif change == "clear":
            st.blobs.clear(name, 0, 512)
        else:
            st.blobs.resize(name, 128 * 1024)
    after = blob.get_blob_properties()
    assert after.etag != before.etag
    assert after.last_modified > before.last_modified
    assert blob.download_blob(offset=0, length=512, if_modified_since=before.last_modified).readall()
    with pytest.raises((ResourceNotModifiedError, ResourceModifiedError)) as e:  # the SDK names a 304 either way
        blob.download_blob(offset=0, length=512, if_modified_since=after.last_modified)
    assert e.value.status_code == 304


def test_writes_within_one_second_keep_its_date_and_the_next_second_moves_it(server, blob):
    """The time is recorded once a second: many writes in one second read as
    that second, and a write in the next one moves it on."""
    with Stamp.open(server.stamp) as st:
        name = f"{blob.container_name}/{blob.blob_name}"
        _next_second()
        st.blobs.write(name, 0, b"a" * 512)
        first = blob.get_blob_properties().last_modified
        st.blobs.write(name, 512, b"b" * 512)
        if int(time.time()) == int(first.timestamp()):  # still that second (almost always)
            assert blob.get_blob_properties().last_modified == first
        _next_second()
        st.blobs.write(name, 1024, b"c" * 512)
        assert blob.get_blob_properties().last_modified > first
