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


@pytest.mark.parametrize("args", [["--extent", "-1"], ["--extent", str(2 ** 64)], ["--extent", "1", "--offset", "-5"],
                                  ["--extent", "1", "--offset", str(10 ** 30)], ["--extent", "1", "--offset", "1000000000"]])
def test_a_bitflip_out_of_range_is_a_clear_error(stamp_dir, capsys, args):
    code = None
    try:
        code = main(["--stamp", stamp_dir, "fault", "bitflip", *args, "node-00"])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and err.strip().splitlines()[-1].startswith("stamp"), err


@pytest.mark.parametrize("ms", ["-5", "nan", "inf"])
def test_a_slow_node_takes_a_finite_delay(stamp_dir, capsys, ms):
    with pytest.raises(SystemExit) as e:
        main(["--stamp", stamp_dir, "fault", "slow", "node-00", "--ms", ms])
    assert e.value.code == 2 and "--ms" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [  # past the parser's checks (above), the stamp's own
    (["bitflip", "--extent", "1", "--offset", "99999999", "node-00"], "outside extent 1's replica file"),
    (["bitflip", "--extent", "99", "node-00"], "extent 99 is not in the metadata"),
    (["slow", "node-00", "--ms", "1e308"], "--ms must be"),
])
def test_a_fault_out_of_range_is_refused_clearly_and_changes_nothing(stamp_dir, capsys, args, says):
    assert main(["--stamp", stamp_dir, "fault", *args]) == 1
    assert says in capsys.readouterr().err
    assert main(["--stamp", stamp_dir, "check"]) == 0  # the node still serves: nothing was recorded


@pytest.mark.parametrize("args, says", [
    (["--target", "0.5"], "--target: 0.5 is not a ratio from 1.01 to 100"),
    (["--target", "nan"], "--target: nan is not a ratio"),
    (["--compact-below", "2"], "--compact-below: 2 is not a share"),
    (["--interval", "-1"], "--interval: -1 is not a number of seconds"),
    (["--watch", "--target", "2", "--trigger", "1.5"], "--trigger (1.5) must not be below --target (2.0)"),
    (["--watch", "--ceiling", "1.2"], "--ceiling (1.2) must be at least --trigger (1.6)"),
    (["--watch", "--ceiling", "1.9", "--compact-below", "0.4"], "and 1 / --compact-below (2.5)"),
])
def test_gc_options_out_of_range_are_usage_errors(stamp_dir, capsys, args, says):
    try:
        code = main(["--stamp", stamp_dir, "gc", *args])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
