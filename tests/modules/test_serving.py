"""Serving: the README's export -> save -> load -> predict block, and quantized TT tables."""

import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.inference.modules import quantize_embeddings, quantize_inference_model

from torchrec_tt import QuantTTEmbeddingBagCollection, TTEmbeddingBagCollection, check_quantized
from torchrec_tt.ops import HAS_EXTENSION
from test_tracing import DLRM, _kjt, _model

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.skipif(not HAS_EXTENSION, reason="export needs the compiled ops")
def test_readme_serving_block_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Serving"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md#serving", "exec"), namespace)
    assert namespace["scores"].shape == (100,)


def _pooled_reference(ebc, kjt) -> torch.Tensor:
    """Independent reference: materialized rows of each (dequantized) table + F.embedding_bag."""
    out = []
    per_key = kjt.to_dict()
    for t in ebc.embedding_bag_configs():
        rows = ebc.embedding_bags[t.name].full_weight()
        mode = "sum" if t.pooling.value == "SUM" else "mean"
        for f in t.feature_names:
            jt = per_key[f]
            out.append(F.embedding_bag(jt.values(), rows, jt.offsets()[:-1], mode=mode, include_last_offset=False))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype,rel", [(None, 0.02), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_quantize_inference_model_swaps_tt_tables(dtype, rel) -> None:
    model = _model().eval()
    kw = {} if dtype is None else {"quantization_dtype": dtype}
    quant = quantize_inference_model(_model().eval(), **kw)
    assert type(quant.ebc) is QuantTTEmbeddingBagCollection
    check_quantized(quant)
    stored = {getattr(quant.ebc.embedding_bags["t0"], "qcore_0").dtype}
    assert stored == {torch.uint8 if dtype is None else dtype}
    assert not any("ebc" in n for n, _ in quant.named_parameters())
    kjt = _kjt(6, 0)
    got = quant.ebc(kjt).values()
    # exact against the dequantized tables' rows ...
    torch.testing.assert_close(got, _pooled_reference(quant.ebc, kjt), atol=1e-5, rtol=1e-5)
    # ... and close to the float model (quantization error of the cores)
    want = model.ebc(kjt).values()
    assert float((got - want).norm() / want.norm()) < rel


def test_per_table_dtype_and_bad_dtype() -> None:
    quant = quantize_inference_model(_model().eval(), per_table_weight_dtype={"t1": torch.float16})
    assert quant.ebc.embedding_bags["t0"].qcore_0.dtype == torch.uint8
    assert quant.ebc.embedding_bags["t1"].qcore_0.dtype == torch.float16
    with pytest.raises(ValueError, match=r"table 't0': quantized TT cores support weight dtypes .* got torch.quint4x2"):
        QuantTTEmbeddingBagCollection.from_float(_model().ebc, weight_dtype=torch.quint4x2)


def test_quantize_embeddings_skip_is_detected_and_mapping_works() -> None:
    skipped = quantize_embeddings(_model().eval(), dtype=torch.qint8, inplace=False)
    with pytest.raises(ValueError, match=r"TT tables left in floating point \(not quantized\): ebc: \['t0', 't1'\]"):
        check_quantized(skipped)
    done = quantize_embeddings(
        _model().eval(), dtype=torch.qint8, inplace=False,
        additional_qconfig_spec_keys=[TTEmbeddingBagCollection],
        additional_mapping={TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection},
    )
    check_quantized(done)
    assert type(done.ebc) is QuantTTEmbeddingBagCollection


@pytest.mark.skipif(not HAS_EXTENSION, reason="export needs the compiled ops")
def test_quantized_model_exports() -> None:
    quant = quantize_inference_model(_model().eval())
    kjt, dense = _kjt(4, 0), torch.randn(4, 4)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(
        quant, (dense, kjt), strict=False,
        dynamic_shapes={"dense": {0: batch}, "features": [{0: torch.export.Dim("ids")}, None, {0: 3 * batch}, None, None, None]},
    )
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    served = torch.export.load(buffer).module()
    kjt, dense = _kjt(7, 3), torch.randn(7, 4)
    torch.testing.assert_close(served(dense, kjt), quant(dense, kjt), atol=1e-6, rtol=0)
