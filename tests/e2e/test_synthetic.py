"""Synthetic liked-item generator and Zipf bags."""

import pytest
import torch

from torchrec_tt.data.synthetic import SyntheticConfig, generate_liked_items, zipf_bags
from torchrec_tt.data.task import LikedTask

SMALL = dict(num_users=3000, num_items=2000, mean_liked=30.0)


@pytest.fixture(scope="module")
def small():
    return generate_liked_items(return_latents=True, **SMALL)


def test_statistics_follow_the_config(small):
    liked, _ = small
    stats = liked.stats()
    assert stats["users"] == 3000
    assert stats["items"] > 0.95 * 2000  # almost every item is liked by someone
    assert stats["P"] == pytest.approx(30.0, rel=0.1)
    assert stats["P_min"] >= 5  # the paper drops users with <= 4 likes
    assert stats["P_median"] < stats["P"]  # long tail of heavy users, as in MovieLens
    # Zipf-like popularity: the 1 % most liked items hold far more than 1 % of the likes.
    assert stats["top1pct_share"] > 0.05


def test_likes_are_distinct_per_user(small):
    liked, _ = small
    keys = liked.user_of_like() * liked.num_items + liked.items
    assert torch.unique(keys).numel() == liked.num_likes


def test_popularity_is_zipf_like_and_scattered_over_ids(small):
    liked, latents = small
    counts = liked.item_counts().double()
    # Realized counts follow the hidden popularity ranks ...
    by_popularity = counts[torch.argsort(latents.popularity, descending=True)]
    head, tail = by_popularity[:20].mean(), by_popularity[-1000:].mean()
    assert head > 10 * tail
    # ... and hot items are not the low ids (ids carry no popularity information).
    assert abs(float(torch.corrcoef(torch.stack([counts, torch.arange(2000.0, dtype=torch.float64)]))[0, 1])) < 0.1


def test_latent_factors_make_likes_predictable(small, pipeline):
    liked, latents = small
    task = LikedTask(liked, seed=1)
    test = task.test_examples()
    # The generating model's own score separates held-out likes from popularity-matched
    # negatives: the signal a trained model can learn ...
    oracle = latents.like_probability(test.users, test.candidates) / (task.item_counts[test.candidates] + 1.0)
    assert pipeline.auc_score(oracle, test.labels) > 0.85
    # ... while popularity alone cannot.
    assert pipeline.auc_score(task.item_counts[test.candidates].double(), test.labels) < 0.6


def test_deterministic_by_seed():
    a = generate_liked_items(num_users=200, num_items=300, mean_liked=10.0, seed=3)
    b = generate_liked_items(SyntheticConfig(num_users=200, num_items=300, mean_liked=10.0, seed=3))
    c = generate_liked_items(num_users=200, num_items=300, mean_liked=10.0, seed=4)
    assert torch.equal(a.items, b.items) and torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.items, c.items)


def test_defaults_are_movielens_20m():
    cfg = SyntheticConfig()
    assert (cfg.num_users, cfg.num_items, cfg.mean_liked, cfg.min_liked) == (65_000, 20_500, 45.0, 5)


@pytest.mark.parametrize(
    "field, value", [("num_users", 0), ("mean_liked", 5.0), ("noise", 1.5), ("num_items", 6), ("taste_concentration", 0.0)]
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SyntheticConfig: {field}="):
        SyntheticConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_zipf_bags_layout(dtype):
    indices, offsets = zipf_bags(1000, batch_size=64, pooling_factor=20, alpha=1.0, seed=0, dtype=dtype)
    assert indices.dtype == offsets.dtype == dtype
    assert offsets.shape == (65,) and int(offsets[0]) == 0 and int(offsets[-1]) == indices.numel() == 64 * 20
    assert int(indices.min()) >= 0 and int(indices.max()) < 1000
    again, _ = zipf_bags(1000, batch_size=64, pooling_factor=20, alpha=1.0, seed=0, dtype=dtype)
    assert torch.equal(indices, again)


def test_zipf_bags_skew_and_options():
    indices, _ = zipf_bags(10_000, batch_size=512, pooling_factor=40, alpha=1.2, seed=1, shuffle_rows=False)
    counts = torch.bincount(indices, minlength=10_000)
    assert int(counts[0]) == int(counts.max())  # unshuffled: row 0 is the hottest
    assert float(counts[:100].sum()) > 0.5 * indices.numel()
    uniform, _ = zipf_bags(10_000, batch_size=512, pooling_factor=40, alpha=0.0, seed=1)
    assert float(torch.bincount(uniform, minlength=10_000)[:100].sum()) < 0.05 * uniform.numel()
    _, offsets = zipf_bags(100, batch_size=200, pooling_factor=5, seed=2, variable_lengths=True)
    lengths = offsets[1:] - offsets[:-1]
    assert int(lengths.min()) != int(lengths.max()) and float(lengths.double().mean()) == pytest.approx(5, rel=0.2)
    empty_indices, empty_offsets = zipf_bags(100, batch_size=0, pooling_factor=5)
    assert empty_indices.numel() == 0 and empty_offsets.tolist() == [0]
    with pytest.raises(ValueError, match="num_rows >= 1"):
        zipf_bags(0, 4, 4)


def test_impossible_config_is_reported():
    with pytest.raises(ValueError, match="fewer than min_liked=5 distinct likes; raise noise"):
        generate_liked_items(num_users=50, num_items=10, mean_liked=6.0, num_tastes=10, noise=0.0,
                             taste_concentration=0.01)
