"""torchrec_tt: Tensor-Train compressed embedding bags for TorchRec (TT-Rec and GRT-GnR)."""

from torchrec_tt.cache import CacheUpdate  # noqa: F401
from torchrec_tt.configs import TTEmbeddingBagConfig  # noqa: F401
from torchrec_tt.convert import MixedEmbeddingBagCollection, convert_ebc_to_tt  # noqa: F401
from torchrec_tt.enums import PoolingMode, Variant  # noqa: F401
from torchrec_tt.init import from_dense, tt_to_dense  # noqa: F401
from torchrec_tt.modules import TTEmbeddingBag, TTEmbeddingBagCollection  # noqa: F401
from torchrec_tt.distributed import (  # noqa: F401  (after modules: the sharder wraps them)
    ShardedTTEmbeddingBagCollection,
    ShmDataParallelWrapper,
    TTEmbeddingBagCollectionSharder,
    TTFusedOptimizer,
    TTPerfEstimator,
    TTStorageEstimator,
    load_tt_optimizer_state_dict,
    make_tt_planner,
    tt_optimizer_state_dict,
)
from torchrec_tt.op_counts import OpCounts, chain_flops, count_ops, expected_groups_per_bag  # noqa: F401
from torchrec_tt.ops import HAS_EXTENSION, group_plan, tt_embedding_bag  # noqa: F401
from torchrec_tt.quant import QuantTTEmbeddingBagCollection, check_quantized  # noqa: F401  (registers it with TorchRec)
from torchrec_tt.tt_shapes import suggest_tt_shapes  # noqa: F401

__version__ = "0.1.0"
