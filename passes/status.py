"""The fixed vocabularies of the conversion passes, as ``str`` enums.

Each member *is* its string (``Status.CONVERTED == "converted"``, it formats,
hashes, pickles and JSON-encodes as ``"converted"``), so code and tests that
compare with the bare strings keep working while new code gets a name to
import and a typo becomes an AttributeError.
"""
from __future__ import annotations

import enum

__all__ = ["StrEnum", "Status", "CandidateKind", "UnitKind", "Strategy", "Normalize", "Region"]


class StrEnum(str, enum.Enum):
    """A ``str`` whose value is fixed; ``str()`` and ``format()`` give the plain value."""

    __str__ = str.__str__
    __format__ = str.__format__

    def __repr__(self) -> str:  # so a Summary or a test failure shows the string
        return repr(self.value)


class Status(StrEnum):
    """``Candidate.status``, set by the rewrite pass."""

    CONVERTED = "converted"
    ALREADY_L1 = "already l1"
    KEPT = "kept"
    SKIPPED = "skipped"

    @classmethod
    def is_l1(cls, status: str) -> bool:
        """The layer is ℓ1 after conversion (converted now, or before)."""
        return status in (cls.CONVERTED, cls.ALREADY_L1)


class CandidateKind(StrEnum):
    """``Candidate.kind``."""

    MODULE = "module"
    FUNCTION = "function"


class UnitKind(StrEnum):
    """``Unit.kind``."""

    SHARED_MLP = "shared-mlp"
    SINGLE = "single"


class Strategy(StrEnum):
    """``ConvertConfig.strategy``: which units the ratio takes first."""

    DEPTH = "depth"
    ENERGY = "energy"


class Normalize(StrEnum):
    """``ConvertConfig.normalize`` (``None`` means no output normalisation)."""

    AUTO = "auto"


class Region(StrEnum):
    """``Candidate.region`` of a layer in the fx graph (else the swapped module's name)."""

    TRACED = "traced"
