"""The two mode enums of the ops: ``Variant`` and ``PoolingMode`` (like FBGEMM's ``PoolingMode``).

Their integer values are what ``torch.ops.torchrec_tt.*`` take (``int variant``, ``int
pooling_mode``) and match the C++ ``enum class``es in ``csrc/include/torchrec_tt/checks.h``.
Strings (``"grt"``, ``"sum"``) and TorchRec's ``PoolingType`` stay accepted at the API surface
and are converted once, with :meth:`Variant.parse` / :meth:`PoolingMode.parse`.
"""

import enum
from typing import Union

from torchrec.modules.embedding_configs import PoolingType

_ARGUMENT = {"Variant": "variant", "PoolingMode": "pooling"}


class _ParsedIntEnum(enum.IntEnum):
    """An ``IntEnum`` that also parses its members' lower-case names."""

    @classmethod
    def parse(cls, value: object, where: str = "", argument: str = "") -> "_ParsedIntEnum":
        """The member for ``value`` (a member, its int value or its name in any case).

        Raises:
            ValueError: ``<where>: <argument> must be one of [...], got <value>``.
        """
        if isinstance(value, cls):
            return value
        raw = value
        if isinstance(value, enum.Enum):
            # torchrec's PoolingType (a str enum) by its value; never another IntEnum's member.
            raw = value.value if isinstance(value.value, str) else None
        if isinstance(raw, str):
            member = cls.__members__.get(raw.upper())
            if member is not None:
                return member
        elif isinstance(raw, int) and not isinstance(raw, bool):
            try:
                return cls(raw)
            except ValueError:
                pass
        names = [m.name.lower() for m in cls]
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{argument or _ARGUMENT[cls.__name__]} must be one of {names} (or {cls.__name__}), got {value!r}")

    def __str__(self) -> str:
        return self.name.lower()


class Variant(_ParsedIntEnum):
    """Which algorithm computes the bags (both give the same values).

    ``TT``: one chain of core products per lookup (the TT-Rec baseline).
    ``GRT``: group-reduced TT gather and reduce (GRT-GnR), one chain per distinct group.
    """

    TT = 0
    GRT = 1


class PoolingMode(_ParsedIntEnum):
    """How the rows of a bag are pooled. ``MEAN`` divides by the bag length (not the weights)."""

    SUM = 0
    MEAN = 1


VariantLike = Union[Variant, str, int]
PoolingLike = Union[PoolingMode, PoolingType, str, int]
