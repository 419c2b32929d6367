"""A 2-rank torchrun job in which rank 1 alone feeds an out-of-range id (run by test_tt_faults.py).

    torchrun --standalone --nproc_per_node 2 tests/distributed/torchrun_bad_id.py [--no-validate]

Step 0 trains both ranks normally; at step 1 rank 1's batch holds id 85 for feature ``f2`` of
table ``t1`` (85 rows), a table that rank 0 owns. Rank 1, the sender, raises ``ValueError``
before the input all-to-all, while rank 0 is already waiting in it; the job must then fail
promptly (gloo reports the closed connection on rank 0, torchrun's agent stops what is left).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402
from torchrec import KeyedJaggedTensor  # noqa: E402

from tt_dist_testing import SparseArch, interleaved_plan, rank_batches, shard, tt_tables  # noqa: E402
from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder  # noqa: E402

BAD_ID = 85  # table t1 (feature f2, on rank 0) has 85 rows


def with_bad_id(kjt: KeyedJaggedTensor, feature: str = "f2") -> KeyedJaggedTensor:
    """``kjt`` with its first id of ``feature`` replaced by ``BAD_ID``."""
    k = kjt.keys().index(feature)
    start, length = kjt.offset_per_key()[k], kjt.length_per_key()[k]
    assert length > 0, f"feature {feature} is empty in this batch"
    values = kjt.values().clone()
    values[start] = BAD_ID
    return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), weights=kjt.weights_or_none())


@record
def main() -> None:
    validate = "--no-validate" not in sys.argv[1:]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SparseArch(tt_tables("grt"), validate_inputs=validate)
    sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})]
    dmp = shard(model, dist.group.WORLD, interleaved_plan(model, world_size, *sharders), sharders, torch.device("cpu"))
    for step in range(2):
        batch = rank_batches(model, world_size, seed=step)[rank]
        if step == 1 and rank == 1:
            batch = with_bad_id(batch)
        print(f"rank {rank}: step {step} at {time.time():.3f}", flush=True)
        dmp(batch).sum().backward()
    print(f"rank {rank}: done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
