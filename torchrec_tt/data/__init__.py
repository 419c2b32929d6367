"""Data for the end-to-end examples: MovieLens-20M and Criteo Kaggle, their synthetic twins,
row renumbering.

The core package does not import this subpackage; the benchmarks use
:func:`~torchrec_tt.data.synthetic.zipf_bags`.
"""

from torchrec_tt.data.criteo import (  # noqa: F401
    CriteoData,
    CriteoSyntheticConfig,
    KAGGLE_CARDINALITIES,
    generate_criteo,
    read_criteo_tsv,
)
from torchrec_tt.data.liked import LikedItems  # noqa: F401
from torchrec_tt.data.movielens import load_movielens  # noqa: F401
from torchrec_tt.data.renumber import (  # noqa: F401
    cluster_renumbering,
    FeatureRenumbering,
    frequency_renumbering,
    group_stats,
    LookupStats,
)
from torchrec_tt.data.synthetic import generate_liked_items, SyntheticConfig, SyntheticLatents, zipf_bags  # noqa: F401
from torchrec_tt.data.task import LikedTask  # noqa: F401
