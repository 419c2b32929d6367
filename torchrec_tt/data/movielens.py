"""MovieLens ``ratings.csv`` loader with the GRT-GnR paper's preprocessing.

``liked = rating >= 4``; users with at most 4 liked items are dropped; the remaining
users and the items they liked are renumbered ``0 … n-1`` in order of their original id.
Nothing is downloaded: the user passes the path of ``ratings.csv`` (or of the directory
holding it), e.g. the ``ml-20m`` folder of https://grouplens.org/datasets/movielens/20m/.
"""

import csv
import os
import warnings
from typing import List, Tuple

import numpy as np
import torch

from torchrec_tt.data.liked import LikedItems

REQUIRED_COLUMNS = ("userId", "movieId", "rating")
LIKE_THRESHOLD = 4.0  # liked = rating >= 4
MIN_LIKED = 5  # users with <= 4 liked items are dropped


def resolve_ratings_path(path: str) -> str:
    """``path`` itself, or ``path/ratings.csv`` when ``path`` is a directory."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        path = os.path.join(path, "ratings.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MovieLens ratings file not found: '{path}' (expected a ratings.csv with the header "
            f"'userId,movieId,rating,timestamp', or a directory such as ml-20m/ that holds one)"
        )
    return path


def _header_columns(path: str) -> Tuple[int, int, int]:
    with open(path, newline="") as f:
        header = f.readline().strip()
    names = [n.strip() for n in header.split(",")]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path}: line 1: header {header!r} lacks the column(s) {missing}; "
            f"expected 'userId,movieId,rating,timestamp'"
        )
    return tuple(names.index(c) for c in REQUIRED_COLUMNS)  # type: ignore[return-value]


def _find_bad_line(path: str, columns: Tuple[int, int, int]) -> str:
    """Line-by-line scan naming the first malformed line and column (slow path, errors only)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        names = [n.strip() for n in next(reader)]
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(columns):
                return (f"line {line_no}: expected {len(names)} comma-separated columns, found {len(row)}: "
                        f"{','.join(row)!r}")
            for col, kind in zip(columns, ("id", "id", "rating")):
                cell = row[col].strip()
                where = f"line {line_no}, column {col + 1} ('{names[col]}')"
                try:
                    value = int(cell) if kind == "id" else float(cell)
                except ValueError:
                    expected = "an integer id" if kind == "id" else "a number"
                    return f"{where}: expected {expected}, found {cell!r}"
                if kind == "id" and value < 0:
                    return f"{where}: ids must be non-negative, found {value}"
                if kind == "rating" and not (np.isfinite(value) and value >= 0):
                    return f"{where}: ratings must be finite and non-negative, found {cell!r}"
    return "unknown parse error"


def read_ratings(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user_ids, movie_ids, ratings)`` arrays from a ``ratings.csv``.

    Raises:
        FileNotFoundError: the file (or ``ratings.csv`` in a directory) does not exist.
        ValueError: the header lacks a required column, or a line is malformed; the
            message names the path, the line and the column.
    """
    path = resolve_ratings_path(path)
    columns = _header_columns(path)
    dtype = [("user", np.int64), ("movie", np.int64), ("rating", np.float64)]
    try:
        # numpy's C parser: ~0.2 s per million lines; ML-20M (20M lines) loads in a few seconds.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=columns, dtype=dtype, ndmin=1)
        bad_values = table.size and (
            table["user"].min() < 0 or table["movie"].min() < 0 or not np.all(np.isfinite(table["rating"]))
            or table["rating"].min() < 0
        )
    except ValueError:
        bad_values = True
    if bad_values:
        raise ValueError(f"{path}: malformed ratings file: {_find_bad_line(path, columns)}")
    if table.size == 0:
        raise ValueError(f"{path}: no ratings after the header line")
    return table["user"], table["movie"], table["rating"]


def liked_items_from_ratings(
    users: np.ndarray,
    movies: np.ndarray,
    ratings: np.ndarray,
    like_threshold: float = LIKE_THRESHOLD,
    min_liked: int = MIN_LIKED,
) -> LikedItems:
    """The paper's preprocessing of raw ratings.

    Args:
        users, movies, ratings (np.ndarray): one entry per rating.
        like_threshold (float): ``liked = rating >= like_threshold``.
        min_liked (int): users with fewer liked items are dropped.
    """
    liked = ratings >= like_threshold
    users, movies = users[liked], movies[liked]
    users, movies = torch.from_numpy(users), torch.from_numpy(movies)
    stride = int(movies.max()) + 1 if movies.numel() else 1
    keys = torch.unique(users * stride + movies)  # dedupe, sort by (user, movie)
    pair_users, pair_movies = keys // stride, keys % stride
    kept_users, per_user = torch.unique_consecutive(pair_users, return_counts=True)
    keep_user = per_user >= min_liked
    pair_movies = pair_movies[torch.repeat_interleave(keep_user, per_user)]
    user_ids, lengths = kept_users[keep_user], per_user[keep_user]
    item_ids, items = torch.unique(pair_movies, return_inverse=True)
    offsets = torch.zeros(len(user_ids) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return LikedItems(offsets=offsets, items=items, num_items=len(item_ids), user_ids=user_ids, item_ids=item_ids)


def load_movielens(path: str, like_threshold: float = LIKE_THRESHOLD, min_liked: int = MIN_LIKED) -> LikedItems:
    """Load MovieLens ratings and keep every user's liked items.

    On ML-20M the paper's preprocessing is ``liked = rating >= 4`` and drops users with at
    most 4 liked items; see :func:`liked_items_from_ratings`.

    Args:
        path (str): ``ratings.csv`` (``userId,movieId,rating,timestamp``) or its directory.
        like_threshold (float): a rating at least this high is a like.
        min_liked (int): users with fewer liked items are dropped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed file (the message names the path, line and column), or no
            user left after filtering.

    Example::

        liked = load_movielens("~/data/ml-20m/ratings.csv")
        liked.stats()  # {'users': ..., 'items': ..., 'P': ...}
    """
    users, movies, ratings = read_ratings(path)
    liked = liked_items_from_ratings(users, movies, ratings, like_threshold, min_liked)
    if liked.num_users == 0:
        raise ValueError(
            f"{resolve_ratings_path(path)}: no user has >= {min_liked} ratings >= {like_threshold} "
            f"({len(ratings)} ratings read)"
        )
    return liked


__all__: List[str] = ["load_movielens", "read_ratings", "liked_items_from_ratings", "resolve_ratings_path"]
