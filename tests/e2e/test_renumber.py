"""Frequency-aware renumbering: the mapping, the input-path module and its effect on P_G."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagConfig, count_ops
from torchrec_tt.data.renumber import FeatureRenumbering, frequency_renumbering, group_stats
from torchrec_tt.data.synthetic import zipf_bags


def test_most_frequent_first_ties_keep_order():
    mapping = frequency_renumbering(torch.tensor([1, 5, 0, 5, 2]))
    assert mapping.tolist() == [3, 0, 4, 1, 2]
    with pytest.raises(ValueError, match="1-D"):
        frequency_renumbering(torch.zeros(2, 2))


def test_module_maps_only_its_features_and_lives_in_state_dict():
    mapping = torch.tensor([2, 0, 3, 1])
    renumber = FeatureRenumbering(4, ["history"], mapping)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "candidate"], values=torch.tensor([0, 1, 2, 3, 3]), lengths=torch.tensor([2, 1, 1, 1])
    )
    out = renumber(kjt)
    assert out.keys() == ["history", "candidate"]
    assert out.values().tolist() == [2, 0, 3, 3, 3]  # candidate ids untouched
    assert torch.equal(out.lengths(), kjt.lengths())
    both = FeatureRenumbering(4, ["history", "candidate"], mapping)(kjt)
    assert both.values().tolist() == [2, 0, 3, 1, 1]

    state = renumber.state_dict()
    assert torch.equal(state["mapping"], mapping)
    restored = FeatureRenumbering(4, ["history"])
    assert restored.mapping.tolist() == [0, 1, 2, 3]  # identity until loaded
    restored.load_state_dict(state)
    assert torch.equal(restored(kjt).values(), out.values())


def test_rejects_bad_mappings():
    renumber = FeatureRenumbering(3, ["f"])
    with pytest.raises(ValueError, match="permutation"):
        renumber.set_mapping(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        renumber.set_mapping(torch.tensor([0, 1]))


def test_renumbering_packs_hot_rows_into_fewer_groups():
    config = TTEmbeddingBagConfig(name="t", num_embeddings=4000, embedding_dim=8,
                                  tt_p_shapes=[8, 10, 50], tt_q_shapes=[2, 2, 2], tt_ranks=[4, 4])
    batches = [zipf_bags(4000, batch_size=64, pooling_factor=30, alpha=1.0, seed=s) for s in range(3)]
    counts = torch.bincount(torch.cat([i for i, _ in batches]), minlength=4000)
    mapping = frequency_renumbering(counts)
    before = group_stats(config, batches)
    after = group_stats(config, batches, mapping)
    assert before.pooling_factor == after.pooling_factor == 30
    assert after.groups_per_bag < 0.8 * before.groups_per_bag
    assert after.grt_flops < before.grt_flops
    # The same numbers as count_ops on the renumbered ids (the one source of op counts).
    indices, offsets = batches[0]
    single = group_stats(config, [batches[0]], mapping)
    assert single.groups_per_bag == count_ops(config, mapping[indices], offsets).groups_per_bag
    with pytest.raises(ValueError, match="no bags"):
        group_stats(config, [])
