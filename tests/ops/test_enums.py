"""``Variant`` and ``PoolingMode``: one enum each, parsed once at the API surface."""

import pytest
from torchrec.modules.embedding_configs import PoolingType

import torchrec_tt
from torchrec_tt import PoolingMode, Variant


def test_values_match_the_ops_and_are_exported():
    assert [(m.name, int(m)) for m in Variant] == [("TT", 0), ("GRT", 1)]
    assert [(m.name, int(m)) for m in PoolingMode] == [("SUM", 0), ("MEAN", 1)]
    assert torchrec_tt.Variant is Variant and torchrec_tt.PoolingMode is PoolingMode
    assert (str(Variant.GRT), str(PoolingMode.MEAN)) == ("grt", "mean")


@pytest.mark.parametrize("value, member", [
    ("grt", Variant.GRT), ("TT", Variant.TT), (0, Variant.TT), (Variant.GRT, Variant.GRT),
])
def test_variant_parse(value, member):
    assert Variant.parse(value) is member


@pytest.mark.parametrize("value, member", [
    ("sum", PoolingMode.SUM), ("Mean", PoolingMode.MEAN), (1, PoolingMode.MEAN),
    (PoolingType.SUM, PoolingMode.SUM), (PoolingType.MEAN, PoolingMode.MEAN),
])
def test_pooling_parse(value, member):
    assert PoolingMode.parse(value) is member


@pytest.mark.parametrize("value", ["fast", "", 2, -1, 1.0, True, None, PoolingMode.SUM, PoolingType.SUM])
def test_variant_parse_rejects(value):
    """Never another enum's member (PoolingMode.SUM is 0, not Variant.TT), nor bools or floats."""
    with pytest.raises(ValueError) as excinfo:
        Variant.parse(value, "tt_embedding_bag")
    assert str(excinfo.value) == f"tt_embedding_bag: variant must be one of ['tt', 'grt'] (or Variant), got {value!r}"


@pytest.mark.parametrize("value", [PoolingType.NONE, "max", 2, Variant.GRT])
def test_pooling_parse_rejects(value):
    with pytest.raises(ValueError) as excinfo:
        PoolingMode.parse(value, "table 't'")
    assert str(excinfo.value) == f"table 't': pooling must be one of ['sum', 'mean'] (or PoolingMode), got {value!r}"
