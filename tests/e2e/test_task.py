"""Leave-out split, negative sampling and batches of the liked-item task."""

import pytest
import torch

from torchrec_tt.data.synthetic import generate_liked_items
from torchrec_tt.data.task import LikedTask


@pytest.fixture(scope="module")
def task():
    return LikedTask(generate_liked_items(num_users=400, num_items=300, mean_liked=12.0), train_positives=2, seed=0)


def _liked(task, users, items):
    return task._is_liked(users, items)


def test_split_holds_out_one_like_per_user(task):
    liked = task.liked
    assert torch.equal(task.history_lengths, liked.lengths() - 1)
    for u in range(0, task.num_users, 37):
        full = set(liked.items[liked.offsets[u]:liked.offsets[u + 1]].tolist())
        history = task.history_items[task.history_offsets[u]:task.history_offsets[u + 1]].tolist()
        assert task.test_items[u].item() not in history
        assert set(history) | {task.test_items[u].item()} == full
    # Renumbering / popularity use training data only.
    assert int(task.item_counts.sum()) == task.history_items.numel()


def test_train_examples(task):
    ex = task.train_examples(epoch=0)
    assert len(ex) == task.num_users * 2 * 2  # 2 positives per user, 1 negative each
    pos, neg = ex.labels == 1, ex.labels == 0
    assert int(pos.sum()) == int(neg.sum())
    assert bool(_liked(task, ex.users[pos], ex.candidates[pos]).all())
    assert not bool(_liked(task, ex.users[neg], ex.candidates[neg]).any())
    values, lengths = task.history_bags(ex.users, ex.drop)
    # Every bag leaves one item out, positives leave out the candidate itself.
    assert torch.equal(lengths, task.history_lengths[ex.users] - 1)
    start = 0
    for k in range(50):
        bag = values[start:start + lengths[k]].tolist()
        start += int(lengths[k])
        if ex.labels[k] == 1:
            assert ex.candidates[k].item() not in bag
    assert not torch.equal(task.train_examples(epoch=1).candidates, ex.candidates)
    assert torch.equal(task.train_examples(epoch=0).candidates, ex.candidates)


def test_test_examples(task):
    ex = task.test_examples(max_users=100)
    assert len(ex) == 200 and int(ex.labels.sum()) == 100
    assert torch.equal(ex.candidates[:100], task.test_items[ex.users[:100]])
    assert bool((ex.drop == -1).all())
    _, lengths = task.history_bags(ex.users, ex.drop)
    assert torch.equal(lengths, task.history_lengths[ex.users])


def test_uniform_negatives_and_bad_args():
    liked = generate_liked_items(num_users=100, num_items=200, mean_liked=10.0)
    task = LikedTask(liked, negatives="uniform", train_negatives=3)
    ex = task.train_examples()
    assert int((ex.labels == 0).sum()) == 3 * 100
    with pytest.raises(ValueError, match="negatives='hard'"):
        LikedTask(liked, negatives="hard")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_batches_partition_the_examples(task, world_size):
    ex = task.test_examples(max_users=50)  # 100 examples
    seen, steps = [], set()
    for rank in range(world_size):
        batches = list(task.batches(ex, 16, rank, world_size, pad=True))
        steps.add(len(batches))
        for b in batches:
            assert b.sparse.stride() == 16 and b.dense.shape == (16, 1)
            assert b.sparse.keys() == ["history", "candidate"]
            seen.append(b.labels[b.valid])
    assert len(steps) == 1  # every rank runs the same number of steps
    assert torch.cat(seen).numel() == len(ex)
    train = list(task.batches(ex, 16, 0, world_size))
    assert len(train) == len(ex) // (16 * world_size) == task.num_batches(ex, 16, world_size)
    assert all(bool(b.valid.all()) for b in train)
