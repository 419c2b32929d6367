"""MovieLens loader: the paper's preprocessing and clear errors on bad files."""

import pytest
import torch

from torchrec_tt.data.movielens import load_movielens


def _ratings():
    rows = []
    # user 10: 5 likes (kept); user 20: 4 likes + 3 dislikes (dropped: <= 4 liked);
    # user 30: 6 likes incl. movie 7 (kept); user 40: nothing liked (dropped).
    rows += [(10, m, 4.0, 1) for m in (3, 5, 7, 9, 11)]
    rows += [(20, m, 5.0, 1) for m in (3, 5, 7, 100)] + [(20, m, 3.5, 1) for m in (200, 300, 400)]
    rows += [(30, m, 4.5, 1) for m in (5, 7, 13, 17, 19, 23)] + [(30, 500, 1.0, 1)]
    rows += [(40, 3, 2.0, 1)]
    return rows


def test_paper_preprocessing(tmp_path, write_ratings):
    liked = load_movielens(write_ratings(tmp_path / "ratings.csv", _ratings()))
    assert liked.user_ids.tolist() == [10, 30]
    # Items: movies liked by kept users, renumbered in order of movieId.
    assert liked.item_ids.tolist() == [3, 5, 7, 9, 11, 13, 17, 19, 23]
    assert liked.num_items == 9
    assert liked.offsets.tolist() == [0, 5, 11]
    movies = liked.item_ids[liked.items]
    assert movies[:5].tolist() == [3, 5, 7, 9, 11]
    assert movies[5:].tolist() == [5, 7, 13, 17, 19, 23]
    stats = liked.stats()
    assert stats["users"] == 2 and stats["items"] == 9 and stats["P"] == pytest.approx(5.5)


def test_directory_path_and_column_order(tmp_path, write_ratings):
    rows = [f"{r[2]},{r[1]},{r[0]}" for r in _ratings()]  # rating,movieId,userId
    write_ratings(tmp_path / "ratings.csv", rows, header="rating,movieId,userId")
    liked = load_movielens(str(tmp_path))  # the ml-20m/ folder
    assert liked.user_ids.tolist() == [10, 30]


def test_duplicate_ratings_count_once(tmp_path, write_ratings):
    rows = [(1, m, 5, 0) for m in range(5)] + [(1, 0, 4, 9)]
    liked = load_movielens(write_ratings(tmp_path / "r.csv", rows))
    assert liked.num_likes == 5


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "ratings.csv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_movielens(str(missing))


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("1,x,4.0,5", r"line 4, column 2 \('movieId'\): expected an integer id, found 'x'"),
        ("1,2", r"line 4: expected 4 comma-separated columns, found 2"),
        ("1,2,good,5", r"line 4, column 3 \('rating'\): expected a number, found 'good'"),
        ("-1,2,4.0,5", r"line 4, column 1 \('userId'\): ids must be non-negative, found -1"),
        ("1,2,nan,5", r"line 4, column 3 \('rating'\): ratings must be finite"),
    ],
)
def test_malformed_line_names_path_line_and_column(tmp_path, bad_line, match, write_ratings):
    path = write_ratings(tmp_path / "ratings.csv", [(1, 1, 4.0, 1), (1, 2, 4.0, 1), bad_line, (1, 3, 4.0, 1)])
    with pytest.raises(ValueError, match=match) as info:
        load_movielens(path)
    assert path in str(info.value)


def test_bad_header(tmp_path, write_ratings):
    path = write_ratings(tmp_path / "ratings.csv", [(1, 1, 4.0, 1)], header="user,movie,rating,timestamp")
    with pytest.raises(ValueError, match=r"line 1: header .* lacks the column\(s\) \['userId', 'movieId'\]"):
        load_movielens(path)


def test_no_ratings_or_no_users_left(tmp_path, write_ratings):
    with pytest.raises(ValueError, match="no ratings after the header"):
        load_movielens(write_ratings(tmp_path / "a.csv", []))
    with pytest.raises(ValueError, match="no user has >= 5 ratings >= 4"):
        load_movielens(write_ratings(tmp_path / "b.csv", [(1, m, 4.0, 1) for m in range(4)]))


def test_loaded_data_feeds_the_task(tmp_path, write_ratings):
    from torchrec_tt.data.task import LikedTask

    rows = [(u, m, 4.0 + (m % 2), 0) for u in range(30) for m in range(u % 7, u % 7 + 8)]
    task = LikedTask(load_movielens(write_ratings(tmp_path / "r.csv", rows)))
    batch = next(task.batches(task.train_examples(0), 8))
    assert batch.sparse.keys() == ["history", "candidate"]
    assert int(batch.sparse.values().max()) < task.num_items
    assert torch.all(batch.sparse.lengths()[:8] >= 1)
