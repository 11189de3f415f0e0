"""Sub-network specs: the immutable value that names one member of a slimmable family.

A spec is a width multiplier plus the number of active blocks in each stage. Its canonical text form,
``w0p75_d2-2-2-2``, is used everywhere a sub-network is named: CLI, logs, JSON, file names and
checkpoint keys. It holds no dots because PyTorch module names (where per-sub-network BatchNorms are
keyed) cannot contain them; ``p`` stands for the decimal point.

Names across slimssl: ``subnet`` is anything that names a sub-network (:data:`SubnetLike`: a spec, its text, or a
width alone), ``spec`` the :class:`SubnetSpec` it resolves to, and ``name`` its canonical text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import total_ordering
from numbers import Integral, Real
from typing import Union

from ..errors import SlimsslError

_CANONICAL = re.compile(r"^w(\d+)p(\d+)(?:_d(\d+(?:-\d+)*))?$")  # the depths may be left out: full depth
# (a dot between depths, 0.5:2.2.2.2, is read as earlier versions read it: menus saved with one still load)
_DOTTED = re.compile(r"^w?(\d*\.?\d+)(?:[_:]d?(\d+(?:[-,.]\d+)*))?$")


class SubnetError(SlimsslError):
    """A sub-network that cannot exist or is not allowed where it was asked for."""


WIDTH_DECIMALS = 4  # a width is kept (and named) to this many decimals: 0.33333 and 0.33334 are one width


def _format_width(width: float) -> str:
    text = f"{width:.{WIDTH_DECIMALS}f}".rstrip("0")
    if text.endswith("."):
        text += "0"
    return text.replace(".", "p")


@total_ordering
@dataclass(frozen=True, init=False)
class SubnetSpec:
    """Width multiplier in (0, 1] and active blocks per stage (each at least 1)."""

    width: float
    depths: tuple[int, ...]
    # The canonical text form, e.g. ``w0p75_d2-2-2-2``; computed once, so the forward pass only reads a
    # string (also what lets torch.compile trace the private-BatchNorm lookup).
    name: str = field(init=False, compare=False, repr=False)

    # written out rather than generated: the depths may be any iterable of whole numbers (a list from a config),
    # kept as a tuple, and a type checker should accept SubnetSpec(0.5, [2, 2, 2, 2]) as Python does
    def __init__(self, width: float, depths: Iterable[int]) -> None:
        if isinstance(width, bool) or not isinstance(width, Real):
            raise SubnetError(f"width must be a number in (0, 1], got {type(width).__name__} {width!r}")
        rounded = round(float(width), WIDTH_DECIMALS)
        if not 0.0 < rounded <= 1.0:
            raise SubnetError(f"width must be in (0, 1], got {width}")
        if isinstance(depths, (str, bytes)) or not isinstance(depths, Iterable):
            raise SubnetError(f"depths must be whole numbers of blocks per stage, e.g. (2, 2, 2, 2); got {depths!r}")
        given = tuple(depths)  # read once: a generator is used up by the check
        if not all(isinstance(d, Integral) and not isinstance(d, bool) for d in given):
            raise SubnetError(f"depths must be whole numbers of blocks per stage, e.g. (2, 2, 2, 2); got {list(given)}")
        whole = tuple(int(d) for d in given)
        if not whole or any(d < 1 for d in whole):
            raise SubnetError(f"every stage needs at least one block, got depths {list(given)}")
        object.__setattr__(self, "width", rounded)
        object.__setattr__(self, "depths", whole)
        object.__setattr__(self, "name", f"w{_format_width(rounded)}_d{'-'.join(map(str, whole))}")

    def __str__(self) -> str:
        return self.name

    @property
    def size_key(self) -> tuple:
        """What orders sub-networks by size: width, then the number of blocks, then the depths."""
        return (self.width, sum(self.depths), self.depths)

    def __lt__(self, other: object) -> bool:  # sorted(specs): by size, as the menu orders them
        if not isinstance(other, SubnetSpec):
            return NotImplemented
        return self.size_key < other.size_key

    @classmethod
    def parse(cls, text: str, full_depths: Sequence[int] | None = None) -> "SubnetSpec":
        """Parse the canonical form, or the friendlier ``0.75`` / ``w0.75_d1-1-1-1`` / ``0.5:2,2,2,2``.

        A width alone means the full depth of the supernet, so ``full_depths`` is needed for it.
        """
        text = str(text).strip()
        compact = re.sub(r"\s*([_:,-])\s*", r"\1", text)  # "0.5:2, 2, 2, 2", as Python prints a list
        match = _CANONICAL.match(compact)
        if match:
            width, depths = float(f"{match.group(1)}.{match.group(2)}"), match.group(3)
        else:
            match = _DOTTED.match(compact)
            if not match:
                raise SubnetError(
                    f"cannot read sub-network {text!r}; expected the canonical form like 'w0p5_d2-2-2-2', "
                    "or a width like '0.5' (full depth), or '0.5:2,2,2,2'"
                )
            width, depths = float(match.group(1)), match.group(2)
        if depths is None:
            if full_depths is None:
                raise SubnetError(f"sub-network {text!r} gives no depths and no supernet is known to take them from: "
                                  "give them, one per stage (e.g. 'w0p5_d2-2-2-2' or '0.5:2,2,2,2'), or ask the "
                                  f"supernet (supernet.resolve({text!r}))")
            return cls(width, tuple(full_depths))
        return cls(width, tuple(int(d) for d in re.split(r"[-,.]", depths)))

    @classmethod
    def coerce(cls, subnet: "SubnetLike", full_depths: Sequence[int] | None = None) -> "SubnetSpec":
        """A spec from a spec, its text (see :meth:`parse`), a width alone such as ``0.5`` (full depth), or a row
        of results that names it (``{"subnet": ...}``, as ``slimssl.pick_subnet`` and the evaluations return)."""
        if isinstance(subnet, cls):
            return subnet
        if isinstance(subnet, Mapping) and isinstance(subnet.get("subnet"), str):
            return cls.parse(subnet["subnet"], full_depths)
        if isinstance(subnet, str):
            return cls.parse(subnet, full_depths)
        if isinstance(subnet, Real) and not isinstance(subnet, bool):
            if full_depths is not None:  # checked as a width (1e-05 is out of range, not unreadable text)
                return cls(subnet, tuple(full_depths))
            return cls.parse(repr(float(subnet)), full_depths)
        raise SubnetError(f"a sub-network is a SubnetSpec, its name such as 'w0p5_d2-2-2-2', or a width such as "
                          f"0.5; got {type(subnet).__name__} {subnet!r}")

    def check_fits(self, full_depths: Sequence[int]) -> None:
        """Raise if this sub-network cannot be cut from a supernet with ``full_depths`` blocks per stage."""
        if len(self.depths) != len(full_depths):
            raise SubnetError(
                f"sub-network {self.name} has {len(self.depths)} stages, the supernet has {len(full_depths)}"
            )
        for stage, (d, full) in enumerate(zip(self.depths, full_depths)):
            if d > full:
                raise SubnetError(
                    f"sub-network {self.name} asks for {d} blocks in stage {stage + 1}; "
                    f"the supernet has {full} (depths {list(full_depths)})"
                )


# What every function that takes one sub-network accepts: a spec, its text (``"w0p5_d2-2-2-2"``, ``"0.5"``,
# ``"0.5:2,2,2,2"``), a width alone (``0.5``: full depth), or a row of results naming it (``{"subnet": ...}``).
SubnetLike = Union[SubnetSpec, str, float, Mapping]
# What every function that takes several accepts: one of them, a sequence of them, or "all" (or None): the menu.
Subnets = Union[SubnetLike, Sequence[SubnetLike], None]


class Menu(tuple[SubnetSpec, ...]):
    """The ordered desired sub-networks of a supernet, largest first, without repeats."""

    def __new__(cls, specs: Iterable[SubnetSpec | str | float],
                full_depths: Sequence[int] | None = None) -> "Menu":
        """``specs``: sub-networks as :meth:`SubnetSpec.coerce` takes them; a width alone (``0.5``, ``"0.5"``) is
        the width at ``full_depths``."""
        if isinstance(specs, (str, SubnetSpec)):  # a lone name would otherwise be read letter by letter
            raise SubnetError(f"a menu is a list of sub-networks, got the single {specs!r}: write Menu([{specs!r}])")
        specs = [SubnetSpec.coerce(s, full_depths) for s in specs]  # canonical names are taken too
        if len({len(s.depths) for s in specs}) > 1:
            raise SubnetError(f"menu entries have different numbers of stages: {[s.name for s in specs]}")
        unique = sorted(set(specs), reverse=True)
        if not unique:
            raise SubnetError("a menu needs at least one sub-network")
        return super().__new__(cls, unique)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self]

    @property
    def largest(self) -> SubnetSpec:
        return self[0]

    @property
    def smallest(self) -> SubnetSpec:
        return self[-1]

    def require(self, spec: SubnetLike, full_depths: Sequence[int] | None = None) -> SubnetSpec:
        """Return the menu entry for ``spec`` or raise an error that lists the menu. A width alone means the
        depth of ``full_depths``, by default that of the menu's largest entry."""
        spec = SubnetSpec.coerce(spec, self.largest.depths if full_depths is None else full_depths)
        if spec not in self:
            raise SubnetError(f"sub-network {spec.name} is not in the menu {self.names}")
        return spec

    def __contains__(self, item: object) -> bool:
        """A spec, its canonical name or text, or a width alone (at the largest entry's depth)."""
        if isinstance(item, SubnetSpec):
            return tuple.__contains__(self, item)
        try:
            return tuple.__contains__(self, SubnetSpec.coerce(item, self.largest.depths))
        except (SubnetError, TypeError, ValueError):
            return False

    def __repr__(self) -> str:
        return f"Menu({self.names})"
