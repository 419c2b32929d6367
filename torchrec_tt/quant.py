"""Inference (quantized) TT tables for TorchRec's ``quantize_inference_model``.

Importing :mod:`torchrec_tt` registers :class:`QuantTTEmbeddingBagCollection` in TorchRec's
``DEFAULT_QUANT_MAPPING``, so ``torchrec.inference.modules.quantize_inference_model`` swaps every
``TTEmbeddingBagCollection`` for it, as it swaps ``EmbeddingBagCollection`` for
``QuantEmbeddingBagCollection``. The cores are stored in the requested weight dtype (int8:
row-wise asymmetric uint8 codes with an fp32 scale and bias per ``(m_k, R[k])`` slice row, the
scheme of TorchRec's row-wise int8 tables; fp16/bf16: cast) and dequantized to fp32 per call
(they are small); the lookups accumulate in fp32.
"""

import copy
from typing import Dict, List, Optional

import torch
from torch import nn

from torchrec_tt.modules import TTEmbeddingBag, TTEmbeddingBagCollection

_INT8 = (torch.qint8, torch.quint8, torch.int8, torch.uint8)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def quantize_core(core: torch.Tensor, dtype: torch.dtype):
    """``(codes, scale, bias)``: ``core ≈ codes * scale + bias`` per ``(m_k, R[k])`` row."""
    if dtype in _FLOAT:
        return core.detach().to(dtype).clone(), None, None
    rows = core.detach().float().reshape(core.size(0) * core.size(1), -1)
    low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    scale = ((high - low) / 255.0).clamp_min(1e-12)
    codes = torch.round((rows - low) / scale).clamp(0, 255).to(torch.uint8)
    return codes.reshape(core.shape), scale.reshape(core.size(0), core.size(1), 1, 1), low.reshape(core.size(0), core.size(1), 1, 1)


class QuantTTEmbeddingBag(TTEmbeddingBag):
    """A :class:`TTEmbeddingBag` whose cores are quantized buffers (no parameters)."""

    @classmethod
    def from_float(cls, bag: TTEmbeddingBag, dtype: torch.dtype) -> "QuantTTEmbeddingBag":
        if bag.config.cache_rows > 0:
            raise ValueError(
                f"table '{bag.config.name}': quantized TT tables do not support a hot-row cache "
                f"(cache_rows={bag.config.cache_rows}); quantize a table with cache_rows=0"
            )
        if dtype not in _INT8 + _FLOAT:
            raise ValueError(
                f"table '{bag.config.name}': quantized TT cores support weight dtypes "
                f"int8/uint8/qint8/quint8, float16, bfloat16, float32, got {dtype}"
            )
        new = copy.copy(bag)  # shallow: shares config; parameters replaced below
        new.__class__ = cls
        new._modules = dict(bag._modules)
        new._buffers = dict(bag._buffers)
        new._parameters = dict(bag._parameters)
        cores = [c for c in bag.cores]
        del new._modules["cores"]
        new.weight_dtype = dtype
        new.num_cores = len(cores)
        for k, core in enumerate(cores):
            codes, scale, bias = quantize_core(core, dtype)
            new.register_buffer(f"qcore_{k}", codes)
            new.register_buffer(f"qscale_{k}", scale)
            new.register_buffer(f"qbias_{k}", bias)
        return new

    @property
    def cores(self) -> List[torch.Tensor]:  # type: ignore[override]
        """The fp32 cores, dequantized (small: a few KiB to MiB)."""
        out = []
        for k in range(self.num_cores):
            codes, scale, bias = getattr(self, f"qcore_{k}"), getattr(self, f"qscale_{k}"), getattr(self, f"qbias_{k}")
            out.append(codes.float() if scale is None else codes.float() * scale + bias)
        return out

    def _core_list(self) -> List[torch.Tensor]:
        return self.cores

    def _storage_dtype(self) -> torch.dtype:
        return torch.float32  # dequantized per call

    def reset_parameters(self) -> None:
        raise ValueError(f"table '{self.config.name}': a quantized TT table cannot be re-initialized")

    def copy_from_dense(self, weight: torch.Tensor) -> None:
        raise ValueError(f"table '{self.config.name}': a quantized TT table is read-only; convert the float module")


class QuantTTEmbeddingBagCollection(TTEmbeddingBagCollection):
    """Inference twin of :class:`TTEmbeddingBagCollection` with quantized cores.

    Made by ``torchrec.inference.modules.quantize_inference_model`` (through TorchRec's
    ``DEFAULT_QUANT_MAPPING``) or by :meth:`from_float`; same forward, same outputs up to the
    quantization error.
    """

    @classmethod
    def from_float(
        cls,
        module: TTEmbeddingBagCollection,
        use_precomputed_fake_quant: bool = False,
        weight_dtype: Optional[torch.dtype] = None,
        per_table_weight_dtype: Optional[Dict[str, torch.dtype]] = None,
    ) -> "QuantTTEmbeddingBagCollection":
        """Quantize ``module`` (``weight_dtype`` and ``per_table_weight_dtype`` default to its
        ``qconfig``'s, as TorchRec's ``QuantEmbeddingBagCollection.from_float``)."""
        qconfig = getattr(module, "qconfig", None)
        if weight_dtype is None:
            if qconfig is None:
                raise ValueError(
                    f"QuantTTEmbeddingBagCollection.from_float: tables {[t.name for t in module.embedding_bag_configs()]}: "
                    "give weight_dtype or set module.qconfig"
                )
            weight_dtype = qconfig.weight().dtype
        if per_table_weight_dtype is None and qconfig is not None:
            per_table_weight_dtype = getattr(qconfig, "per_table_weight_dtype", None)
        per_table_weight_dtype = per_table_weight_dtype or {}
        new = copy.copy(module)
        new.__class__ = cls
        new._modules = dict(module._modules)
        new.embedding_bags = nn.ModuleDict(
            {
                name: QuantTTEmbeddingBag.from_float(bag, per_table_weight_dtype.get(name, weight_dtype))
                for name, bag in module.embedding_bags.items()
            }
        )
        return new


def _register_in_torchrec() -> None:
    """Let ``quantize_inference_model`` swap TT collections (TorchRec's typename-keyed mapping)."""
    try:
        from torchrec.inference.modules import DEFAULT_QUANT_MAPPING, trim_torch_package_prefix_from_typename
    except ImportError:  # pragma: no cover - torchrec without the inference package
        return
    key = trim_torch_package_prefix_from_typename(torch.typename(TTEmbeddingBagCollection))
    DEFAULT_QUANT_MAPPING.setdefault(key, QuantTTEmbeddingBagCollection)


_register_in_torchrec()


def check_quantized(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every TT table of ``model`` still in floating point.

    For use after ``torchrec.inference.modules.quantize_embeddings``, which skips module types
    outside its mapping silently.
    """
    left = [
        f"{path or '<root>'}: {[t.name for t in m.embedding_bag_configs()]}"
        for path, m in model.named_modules()
        if isinstance(m, TTEmbeddingBagCollection) and not isinstance(m, QuantTTEmbeddingBagCollection)
    ]
    if left:
        raise ValueError(
            f"TT tables left in floating point (not quantized): {'; '.join(left)}. Use "
            "quantize_inference_model, or pass additional_qconfig_spec_keys=[TTEmbeddingBagCollection], "
            "additional_mapping={TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection} to quantize_embeddings"
        )
