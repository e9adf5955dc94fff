"""fastpatch.export_onnx: accelerated BERT and GPT-2 as standard-op ONNX files, run in ONNX
Runtime against the PyTorch output at shapes other than the traced ones."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fastpatch  # noqa: E402
from fastpatch.adapters import is_accelerated  # noqa: E402
from inference_models import bert, gpt2, left_padded  # noqa: E402
from numerics import assert_close_relative  # noqa: E402


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _only_standard_ops(path):
    graph = onnx.load(str(path))
    domains = {node.domain for node in graph.graph.node}
    for function in graph.functions:
        domains |= {node.domain for node in function.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert not any("fastpatch" in node.op_type for node in graph.graph.node)


def _accelerated(model):
    model = fastpatch.accelerate(copy.deepcopy(model))
    assert fastpatch.report(model).replaced
    return model


def test_accelerated_bert_exports_and_matches_in_onnxruntime(tmp_path):
    model = _accelerated(bert())
    path = fastpatch.export_onnx(model, tmp_path / "bert.onnx")
    _only_standard_ops(path)
    assert all(is_accelerated(layer) for layer in model.encoder.layer)  # restored after the trace
    ids, mask = left_padded(99, batch=3, length=13, seed=1)
    types = (torch.arange(13) > 6).long().expand(3, 13).contiguous()
    hidden, pooled = _run(path, dict(input_ids=ids, attention_mask=mask, token_type_ids=types))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    m = mask[..., None]
    assert_close_relative(torch.from_numpy(hidden) * m, ref.last_hidden_state * m, 1e-5, "last_hidden_state")
    assert_close_relative(torch.from_numpy(pooled), ref.pooler_output, 1e-5, "pooler_output")


def test_accelerated_bert_with_a_head_exports_its_logits(tmp_path):
    torch.manual_seed(0)
    model = _accelerated(transformers.BertForSequenceClassification(bert().config).eval())
    path = fastpatch.export_onnx(model, tmp_path / "cls.onnx", example_batch=1, example_length=4)
    ids = torch.randint(0, 99, (4, 10))
    (logits,) = _run(path, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.zeros_like(ids)))
    with torch.no_grad():
        assert_close_relative(torch.from_numpy(logits), model(input_ids=ids).logits, 1e-5, "logits")


def test_accelerated_gpt2_exports_and_matches_in_onnxruntime(tmp_path):
    model = _accelerated(gpt2(n_layer=3))
    path = fastpatch.export_onnx(model, tmp_path / "gpt2.onnx")
    _only_standard_ops(path)
    assert all(is_accelerated(block) for block in model.transformer.h)
    ids, mask = left_padded(101, batch=2, length=11, seed=2)
    (logits,) = _run(path, dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    m = mask[..., None]  # padding rows' outputs are unspecified (every key of theirs is masked)
    assert_close_relative(torch.from_numpy(logits) * m, ref * m, 1e-5, "logits")


def test_export_onnx_rejects_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match="supports Hugging Face GPT-2 and BERT-style models"):
        fastpatch.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
