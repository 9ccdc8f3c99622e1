"""The stamp command line: argument orders the help shows, exit codes."""

from __future__ import annotations

import json

import pytest

from stamp import Stamp
from stamp.cli import main


@pytest.fixture
def stamp_dir(tmp_path):
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("b", 1 << 20)
        st.blobs.write("b", 0, b"x" * 4096)
    return path


@pytest.mark.parametrize("order", ["options first", "node first"])
def test_bitflip_takes_its_node_after_or_before_the_extent(stamp_dir, capsys, order):
    with Stamp.open(stamp_dir) as st:
        extent = st.stream.all_extents()[0]
        node = st.stream.nodes[extent.nodes[1]].name
    args = ["--extent", str(extent.id), node] if order == "options first" else [node, "--extent", str(extent.id)]
    assert main(["--stamp", stamp_dir, "fault", "bitflip", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["node"] == node and out["extent"] == extent.id


def test_an_extra_argument_is_a_usage_error(stamp_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--stamp", stamp_dir, "fault", "node-down", "node-00", "node-01"])
    assert e.value.code == 2
    assert "unrecognized arguments: node-01" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["bitflip", "--extent", "1", "--offset", "99999999", "node-00"], "outside extent 1's replica file"),
    (["bitflip", "--extent", "1", "--offset", "-5", "node-00"], "outside extent 1's replica file"),
    (["bitflip", "--extent", "-1", "node-00"], "no extent -1"),
    (["bitflip", "--extent", str(1 << 64), "node-00"], "no extent"),
    (["slow", "node-00", "--ms", "-5"], "--ms must be"),
    (["slow", "node-00", "--ms", "1e308"], "--ms must be"),
    (["slow", "node-00", "--ms", "nan"], "--ms must be"),
])
def test_a_fault_out_of_range_is_refused_clearly_and_changes_nothing(stamp_dir, capsys, args, says):
    assert main(["--stamp", stamp_dir, "fault", *args]) == 1
    assert says in capsys.readouterr().err
    assert main(["--stamp", stamp_dir, "check"]) == 0  # the node still serves: nothing was recorded
