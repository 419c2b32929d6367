"""One call from a trained ``EmbeddingBagCollection`` to TT tables: :func:`convert_ebc_to_tt`."""

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.init import from_dense, tt_to_dense
from torchrec_tt.modules import TTEmbeddingBagCollection
from torchrec_tt.tt_shapes import max_useful_ranks, suggest_tt_shapes, tt_num_params

DEFAULT_RANKS = (2, 4, 8, 16, 32, 64, 128)


class MixedEmbeddingBagCollection(nn.Module):
    """Some tables of an ``EmbeddingBagCollection`` kept dense (``dense``), the others TT
    (``tt``); the output ``KeyedTensor`` has the original collection's keys and order."""

    def __init__(self, dense: EmbeddingBagCollection, tt: TTEmbeddingBagCollection, names: List[str], dims: List[int]) -> None:
        super().__init__()
        self.dense, self.tt = dense, tt
        self._embedding_names, self._dims = names, dims

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """Every table's config, dense and TT, in the order of their first output key
        (what TorchRec's ``DLRM`` reads)."""
        configs = list(self.dense.embedding_bag_configs()) + list(self.tt.embedding_bag_configs())
        position = {name: i for i, name in enumerate(self._embedding_names)}
        return sorted(configs, key=lambda c: position[c.feature_names[0]])

    def is_weighted(self) -> bool:
        return self.tt.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        parts = {**self.dense(features).to_dict(), **self.tt(features).to_dict()}
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims,
                           values=torch.cat([parts[n] for n in self._embedding_names], dim=1))


def _tt_config(table: EmbeddingBagConfig, rank: int, num_cores: int) -> TTEmbeddingBagConfig:
    p, q = suggest_tt_shapes(table.num_embeddings, table.embedding_dim, num_cores)
    ranks = [min(rank, r) for r in max_useful_ranks(p, q)]
    return TTEmbeddingBagConfig(
        name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
        feature_names=list(table.feature_names), pooling=table.pooling, tt_p_shapes=p, tt_q_shapes=q, tt_ranks=ranks,
    )


def _fit(table: EmbeddingBagConfig, weight: torch.Tensor, rank: int, num_cores: int):
    config = _tt_config(table, rank, num_cores)
    cores = from_dense(weight.float(), config.tt_p_shapes, config.tt_q_shapes, config.tt_ranks)
    rows = tt_to_dense([c.float() for c in cores], table.num_embeddings)
    error = float((rows - weight.float()).norm() / weight.float().norm().clamp_min(1e-30))
    return config, cores, error


@torch.no_grad()
def convert_ebc_to_tt(
    model: nn.Module,
    tables: Optional[Sequence[str]] = None,
    memory_budget: Optional[int] = None,
    max_rel_error: Optional[float] = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    num_cores: int = 3,
) -> Dict[str, Dict[str, Union[int, float, List[int]]]]:
    """Replace tables of the model's ``EmbeddingBagCollection``s by TT tables fitted to their weights.

    Each chosen table gets :func:`suggest_tt_shapes` factors and one inner rank from ``ranks``,
    and cores from a TT-SVD of its trained rows (:func:`from_dense`). Ranks: with
    ``max_rel_error``, the smallest rank whose reconstruction error ``||W - W_tt|| / ||W||``
    is at most the target (the largest rank otherwise); with ``memory_budget`` (bytes of all
    converted cores), the largest uniform rank that fits; with both, the error target capped by
    the budget. A collection whose tables are all converted becomes a
    :class:`TTEmbeddingBagCollection`; otherwise a :class:`MixedEmbeddingBagCollection`. Same
    output keys and order either way. In place.

    Args:
        model (nn.Module): holds ``EmbeddingBagCollection``s (or is one; then convert the
            model's parent, since a module cannot replace itself).
        tables (Optional[Sequence[str]]): table names to convert (default: every table).
        memory_budget (Optional[int]): bytes of all converted tables' cores.
        max_rel_error (Optional[float]): relative Frobenius error target per table.
        ranks (Sequence[int]): candidate inner ranks.
        num_cores (int): cores per table.

    Returns:
        Per converted table: ``tt_p_shapes``, ``tt_q_shapes``, ``tt_ranks``, ``tt_bytes``,
        ``dense_bytes``, ``compression``, ``rel_error``.

    Raises:
        ValueError: no budget nor target, an unknown table name, or a budget too small for
            the smallest rank (names the tables and the bytes needed).
    """
    if memory_budget is None and max_rel_error is None:
        raise ValueError("convert_ebc_to_tt: give memory_budget (bytes) or max_rel_error, got neither")
    if isinstance(model, EmbeddingBagCollection):
        raise ValueError("convert_ebc_to_tt: model must hold the EmbeddingBagCollection (a module cannot replace itself), got the collection")
    ranks = sorted(set(int(r) for r in ranks))
    found = [(path, m) for path, m in model.named_modules() if type(m) is EmbeddingBagCollection]
    all_tables = {t.name: (path, m, t) for path, m in found for t in m.embedding_bag_configs()}
    chosen = list(all_tables) if tables is None else list(tables)
    unknown = [t for t in chosen if t not in all_tables]
    if unknown:
        raise ValueError(f"convert_ebc_to_tt: tables {unknown} are not in the model's EmbeddingBagCollections, got tables {list(all_tables)}")
    if not chosen:
        return {}

    def rank_bytes(name: str, rank: int) -> int:
        try:
            return _tt_config(all_tables[name][2], rank, num_cores).storage_bytes()
        except ValueError:
            return 1 << 62  # larger than the dense table: never fits

    budget_rank = ranks[-1]
    if memory_budget is not None:
        fitting = [r for r in ranks if sum(rank_bytes(n, r) for n in chosen) <= memory_budget]
        if not fitting:
            need = sum(rank_bytes(n, ranks[0]) for n in chosen)
            raise ValueError(f"convert_ebc_to_tt: memory_budget={memory_budget} bytes is below the {need} bytes of tables {chosen} at rank {ranks[0]}")
        budget_rank = fitting[-1]
    report: Dict[str, Dict[str, Union[int, float, List[int]]]] = {}
    fitted = {}
    def fits(table: EmbeddingBagConfig, rank: int) -> bool:
        try:  # ranks whose cores would outgrow the dense table are rejected by the config
            _tt_config(table, rank, num_cores)
            return True
        except ValueError:
            return False

    for name in chosen:
        _, ebc, table = all_tables[name]
        weight = ebc.embedding_bags[name].weight.detach()
        candidates = [r for r in ranks if r <= budget_rank and fits(table, r)] or [ranks[0]]
        for rank in candidates if max_rel_error is not None else [candidates[-1]]:
            config, cores, error = _fit(table, weight, rank, num_cores)
            if max_rel_error is not None and error <= max_rel_error:
                break
        fitted[name] = (config, cores)
        report[name] = {"tt_p_shapes": config.tt_p_shapes, "tt_q_shapes": config.tt_q_shapes, "tt_ranks": config.tt_ranks,
                        "tt_bytes": config.storage_bytes(), "dense_bytes": config.dense_bytes(),
                        "compression": config.compression_ratio(), "rel_error": error}
    for path, ebc in found:
        configs = ebc.embedding_bag_configs()
        converted = [t for t in configs if t.name in fitted]
        if not converted:
            continue
        device = next(ebc.parameters()).device
        tt = TTEmbeddingBagCollection([fitted[t.name][0] for t in converted], is_weighted=ebc.is_weighted(), device=device)
        for t in converted:
            for param, core in zip(tt.embedding_bags[t.name].cores, fitted[t.name][1]):
                param.copy_(core)
        kept = [t for t in configs if t.name not in fitted]
        if kept:
            dense = EmbeddingBagCollection(kept, is_weighted=ebc.is_weighted(), device=device)
            for t in kept:
                dense.embedding_bags[t.name].weight.copy_(ebc.embedding_bags[t.name].weight)
            new: nn.Module = MixedEmbeddingBagCollection(
                dense, tt, [f for t in configs for f in t.feature_names],
                [t.embedding_dim for t in configs for _ in t.feature_names])
        else:
            new = tt
        parent_path, _, attr = path.rpartition(".")
        model.get_submodule(parent_path).register_module(attr, new) if parent_path else model.register_module(attr, new)
    return report
