"""SubnetSpec / Menu naming and validation, and the channel-scaling rule."""

from __future__ import annotations

import re

import pytest

from slimssl.nn.channels import scaled_channels
from slimssl.nn.spec import Menu, SubnetError, SubnetSpec

WIDTHS = [1.0, 0.75, 0.5, 0.333, 0.3333, 0.25, 0.125, 0.05]
DEPTHS = [(2, 2, 2, 2), (3, 4, 23, 3), (3, 4, 6, 3), (1, 1, 1, 1), (1,)]


# ---- canonical names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("depths", DEPTHS)
def test_canonical_name_round_trips(width, depths):
    spec = SubnetSpec(width, depths)
    name = spec.name
    assert "." not in name  # names key PyTorch modules, which cannot hold dots
    assert str(spec) == name
    assert re.fullmatch(r"w\d+p\d+_d\d+(-\d+)*", name)
    back = SubnetSpec.parse(name)
    assert back == spec
    assert back.width == pytest.approx(width)
    assert back.depths == tuple(depths)
    assert back.name == name


def test_known_canonical_names():
    assert SubnetSpec(0.75, (2, 2, 2, 2)).name == "w0p75_d2-2-2-2"
    assert SubnetSpec(1.0, (3, 4, 23, 3)).name == "w1p0_d3-4-23-3"
    assert SubnetSpec(0.333, (1, 1, 1, 1)).name == "w0p333_d1-1-1-1"
    assert SubnetSpec(0.5, [1, 2]).depths == (1, 2)


def test_distinct_specs_have_distinct_names():
    specs = {SubnetSpec(w, d) for w in WIDTHS for d in DEPTHS}
    assert len({s.name for s in specs}) == len(specs)


def test_parse_accepts_canonical_text_with_whitespace():
    assert SubnetSpec.parse("  w0p5_d1-2-3-4 ") == SubnetSpec(0.5, (1, 2, 3, 4))


# ---- friendly forms ------------------------------------------------------------------------------------

def test_parse_width_alone_takes_full_depths():
    assert SubnetSpec.parse("0.5", full_depths=(3, 4, 6, 3)) == SubnetSpec(0.5, (3, 4, 6, 3))
    assert SubnetSpec.parse("1", full_depths=(2, 2)) == SubnetSpec(1.0, (2, 2))
    assert SubnetSpec.parse("0.75", full_depths=[3, 4, 23, 3]).name == "w0p75_d3-4-23-3"


def test_parse_width_alone_without_full_depths_is_an_error():
    with pytest.raises(SubnetError):
        SubnetSpec.parse("0.5")


@pytest.mark.parametrize("text, expected", [
    ("w0.5_d1-1-1-1", SubnetSpec(0.5, (1, 1, 1, 1))),
    ("0.5:2,2,2,2", SubnetSpec(0.5, (2, 2, 2, 2))),
    ("0.25:3,4,23,3", SubnetSpec(0.25, (3, 4, 23, 3))),
    ("w1.0_d3-4-6-3", SubnetSpec(1.0, (3, 4, 6, 3))),
    ("0.5:2, 2, 2, 2", SubnetSpec(0.5, (2, 2, 2, 2))),  # as Python prints a list
    ("0.5 : 1,2,1,2", SubnetSpec(0.5, (1, 2, 1, 2))),
    ("0.5:2.2.2.2", SubnetSpec(0.5, (2, 2, 2, 2))),  # as earlier versions read it
])
def test_parse_friendly_forms(text, expected):
    got = SubnetSpec.parse(text, full_depths=(9, 9, 9, 9))  # full depths must not be used here
    assert got == expected
    assert got.name == expected.name


def test_parse_canonical_width_alone_takes_full_depths():
    """The width part of a name (what the progress bar shows, 'w0p5') means full depth, as '0.5' does."""
    assert SubnetSpec.parse("w0p5", full_depths=(3, 4, 6, 3)) == SubnetSpec(0.5, (3, 4, 6, 3))
    with pytest.raises(SubnetError, match="gives no depths"):
        SubnetSpec.parse("w0p5")


@pytest.mark.parametrize("text", ["", "abc", "w_d1-1", "0.5:", "wxp5_d1-1-1-1", "0.5:a,b",
                                  "0.5 2", "0.2 5:1,1,1,1"])  # a space is no decimal point
def test_parse_garbage_raises(text):
    with pytest.raises(SubnetError):
        SubnetSpec.parse(text, full_depths=(2, 2, 2, 2))


# ---- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [0.0, -0.5, 1.5, 1.01, 2])
def test_width_outside_unit_interval_raises(width):
    with pytest.raises(SubnetError, match="width"):
        SubnetSpec(width, (2, 2, 2, 2))


@pytest.mark.parametrize("text", ["w1p5_d2-2-2-2", "1.5", "0:2,2,2,2"])
def test_parse_of_invalid_width_raises(text):
    with pytest.raises(SubnetError):
        SubnetSpec.parse(text, full_depths=(2, 2, 2, 2))


@pytest.mark.parametrize("depths", [(2, 0, 2, 2), (0,), (), (1, -1)])
def test_depth_below_one_raises(depths):
    with pytest.raises(SubnetError):
        SubnetSpec(0.5, depths)


def test_parse_zero_depth_raises():
    with pytest.raises(SubnetError):
        SubnetSpec.parse("w0p5_d2-0-2-2")


def test_spec_is_immutable_and_hashable():
    spec = SubnetSpec(0.5, (1, 1))
    with pytest.raises(AttributeError):
        spec.width = 0.25  # type: ignore[misc]
    assert {spec: 1}[SubnetSpec.parse("0.5:1,1")] == 1


def test_check_fits_accepts_equal_or_shallower():
    SubnetSpec(1.0, (3, 4, 6, 3)).check_fits((3, 4, 6, 3))
    SubnetSpec(0.25, (1, 2, 3, 1)).check_fits((3, 4, 6, 3))


def test_check_fits_rejects_too_deep_naming_both():
    spec = SubnetSpec(1.0, (3, 4, 7, 3))
    with pytest.raises(SubnetError) as err:
        spec.check_fits((3, 4, 6, 3))
    msg = str(err.value)
    assert spec.name in msg
    assert "[3, 4, 6, 3]" in msg or "3-4-6-3" in msg or "(3, 4, 6, 3)" in msg


def test_check_fits_rejects_wrong_stage_count_naming_both():
    spec = SubnetSpec(1.0, (2, 2, 2))
    with pytest.raises(SubnetError) as err:
        spec.check_fits((2, 2, 2, 2))
    msg = str(err.value)
    assert spec.name in msg
    assert re.search(r"\b3\b", msg) and re.search(r"\b4\b", msg)


# ---- menu ----------------------------------------------------------------------------------------------

def test_menu_orders_largest_first_and_dedups():
    full = (2, 2, 2, 2)
    specs = [SubnetSpec(0.25, full), SubnetSpec(1.0, full), SubnetSpec(0.5, full),
             SubnetSpec.parse("0.5", full), SubnetSpec(0.5, (1, 1, 1, 1)), SubnetSpec(1.0, full)]
    menu = Menu(specs)
    assert menu.names == ["w1p0_d2-2-2-2", "w0p5_d2-2-2-2", "w0p5_d1-1-1-1", "w0p25_d2-2-2-2"]
    assert len(menu) == 4
    assert menu.largest == SubnetSpec(1.0, full)
    assert menu.smallest == SubnetSpec(0.25, full)
    assert Menu(reversed(specs)).names == menu.names  # independent of input order


def test_menu_deeper_first_at_equal_width():
    menu = Menu([SubnetSpec(1.0, (2, 2, 2, 2)), SubnetSpec(1.0, (3, 4, 6, 3))])
    assert menu.names == ["w1p0_d3-4-6-3", "w1p0_d2-2-2-2"]
    # "largest" counts blocks, not the lexicographic order of the depths
    menu = Menu([SubnetSpec(0.5, (2, 1, 1, 1)), SubnetSpec(0.5, (1, 2, 1, 2))])
    assert menu.names == ["w0p5_d1-2-1-2", "w0p5_d2-1-1-1"]


def test_empty_menu_raises():
    with pytest.raises(SubnetError):
        Menu([])


def test_menu_require():
    full = (2, 2, 2, 2)
    menu = Menu([SubnetSpec(w, full) for w in (1.0, 0.5, 0.25)])
    assert menu.require("0.5", full) == SubnetSpec(0.5, full)
    assert menu.require("w0p25_d2-2-2-2") == SubnetSpec(0.25, full)
    assert menu.require(SubnetSpec(1.0, full)) == SubnetSpec(1.0, full)
    with pytest.raises(SubnetError) as err:
        menu.require("0.75", full)
    msg = str(err.value)
    assert "w0p75_d2-2-2-2" in msg
    for name in menu.names:
        assert name in msg
    with pytest.raises(SubnetError):
        menu.require(SubnetSpec(0.5, (1, 1, 1, 1)))


# ---- channels ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, width, expected", [
    (2048, 0.25, 512), (64, 0.75, 48), (64, 0.5, 32), (256, 0.75, 192), (10, 0.7, 7),
    (100, 0.333, 33), (64, 0.333, 21), (3, 0.1, 1), (1, 0.25, 1),
    (7, 0.5, 3), (100, 0.6666, 66), (96, 0.3, 28), (2048, 0.7, 1433),
])
def test_scaled_channels_int_rule(channels, width, expected):
    assert scaled_channels(channels, width) == expected


@pytest.mark.parametrize("channels", [1, 3, 20, 64, 2048])
@pytest.mark.parametrize("divisor", [1, 8])
def test_full_width_is_full_count(channels, divisor):
    assert scaled_channels(channels, 1.0, divisor) == channels


@pytest.mark.parametrize("channels", [64, 128, 256, 512, 1024, 2048, 96])
@pytest.mark.parametrize("width", [0.25, 0.3, 0.333, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("divisor", [8, 16])
def test_divisor_rounding(channels, width, divisor):
    got = scaled_channels(channels, width, divisor)
    exact = channels * width
    assert got % divisor == 0
    assert divisor <= got <= channels
    assert got >= 0.9 * exact
    assert abs(got - exact) <= divisor


def test_scaled_channels_monotonic_in_width():
    widths = [0.1, 0.2, 0.25, 0.3, 0.333, 0.5, 0.6, 0.75, 0.9, 1.0]
    for divisor in (1, 8):
        counts = [scaled_channels(256, w, divisor) for w in widths]
        assert counts == sorted(counts)


@pytest.mark.parametrize("channels, width, expected", [(100, 0.29, 29), (100, 0.57, 57), (10, 0.7, 7)])
def test_scaled_channels_survive_float_error(channels, width, expected):
    from slimssl.nn.channels import scaled_channels

    assert scaled_channels(channels, width) == expected  # 0.29 * 100 is 28.999... in floating point
