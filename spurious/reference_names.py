"""The reference code's name strings, parsed in one place: dataset names such as `fashionv8-3-0-0` (protocol §1.3)
and model strings such as `aug01-ce-tor-altResNet20Norm02` (protocol §5.2).

Pure string parsing: the registries (spurious.datasets, spurious.models) resolve the parts to canonical names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from spurious.errors import SpuriousError

@dataclass(frozen=True)
class LegacyName:
    """A reference dataset name, taken apart: e.g. `fashionv8-3-0-0` is S3 on 3 T-shirts, seed 0."""

    dataset: str
    pattern: str | None
    n_spurious: int
    targets: tuple[int, ...]
    data_seed: int
    membership: bool


_DS = r"(?P<ds>mnist|fashion|cifar10)"
_V = r"(?P<v>v[0-9a-z]+)"
_NCS = r"-(?P<n>[0-9]+)-(?P<c>[0-9])-(?P<s>[0-9]+)"
_LEGACY_FORMS = {
    "clean": re.compile(rf"(?P<mem>mem)?{_DS}"),
    "one class": re.compile(rf"{_DS}{_V}?{_NCS}"),
    "two classes": re.compile(rf"twoclassmnist{_V}?-(?P<n>[0-9]+)-(?P<c>[0-9])-(?P<c2>[0-9])-(?P<s>[0-9]+)"),
    "membership": re.compile(rf"(?P<mem>mem){_DS}{_V}{_NCS}"),
}
_ACCEPTED = ("mnist | fashion | cifar10, {ds}{v}-{n}-{c}-{s} (e.g. fashionv8-3-0-0; v optional except for "
             "cifar10), twoclassmnist{v}-{n}-{c1}-{c2}-{s}, mem{ds}, mem{ds}{v}-{n}-{c}-{s} "
             "(e.g. memfashionv20-3-0-1); c is one digit")


def _legacy_from_match(m: re.Match) -> LegacyName:
    """Return the LegacyName for a match of one of the `_LEGACY_FORMS`."""
    groups = m.groupdict()
    dataset = groups.get("ds") or "mnist"
    if groups.get("n") is None:
        return LegacyName(dataset, None, 0, (), 0, bool(groups.get("mem")))
    version = groups.get("v")
    if version is None and dataset == "cifar10":
        raise SpuriousError(f"dataset name {m.string!r}: cifar10 needs a pattern version, "
                            "e.g. cifar10v8-3-0-0")
    targets = tuple(int(groups[k]) for k in ("c", "c2") if groups.get(k) is not None)
    return LegacyName(dataset, version or "v1", int(groups["n"]), targets, int(groups["s"]),
                      bool(groups.get("mem")))


def parse_legacy_name(s: str) -> LegacyName:
    """Return the parts of a reference dataset name such as `mnistv20-100-1-2` (protocol §1.3)."""
    for pattern in _LEGACY_FORMS.values():
        m = pattern.fullmatch(s) if isinstance(s, str) else None
        if m:
            return _legacy_from_match(m)
    raise SpuriousError(f"cannot parse dataset name {s!r}; accepted forms: {_ACCEPTED}")


# protocol §5.2: [augmentation "-"] loss "-tor-" arch ["-hyper"]
_MODEL_STRING = re.compile(
    r"(?:(?P<aug>[A-Za-z0-9_]+)-)?(?P<loss>[A-Za-z0-9_]+)-tor-(?P<arch>[A-Za-z0-9_]+)(?:-hyper)?"
)


@dataclass(frozen=True)
class ModelString:
    """A reference model string, taken apart: augmentation (or None), loss token and architecture token."""

    augmentation: str | None
    loss: str
    arch: str


def parse_model_string(name: str) -> ModelString | None:
    """Return the parts of a reference model string, or None when `name` is not one (a plain model name)."""
    match = _MODEL_STRING.fullmatch(name)
    return None if match is None else ModelString(match["aug"], match["loss"], match["arch"])
