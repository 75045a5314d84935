"""onnx_graph.fold_head_reshapes: the exporter's 4-D Attention becomes one 3-D node, computing
the same thing, and only that exact pattern is rewritten."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnx_graph import fold_head_reshapes


def _attention_graph(heads_shape=(-1, 5, 4, 8), perm=(0, 2, 1, 3), extra_output=None):
    """Reshape/Transpose into heads, Attention (opset 23), and back: what the exporter writes
    for q, k, v of shape (B, 5, 32) with 4 heads of 8."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    for name in ("q", "k", "v"):
        nodes.append(helper.make_node("Reshape", [name, "heads_shape"], [f"{name}4"]))
        nodes.append(helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=list(perm)))
    nodes += [
        helper.make_node("Attention", ["qt", "kt", "vt"], ["y4"]),
        helper.make_node("Transpose", ["y4"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "flat_shape"], ["y"]),
    ]
    shapes = [
        numpy_helper.from_array(np.array(heads_shape), "heads_shape"),
        numpy_helper.from_array(np.array([-1, 5, 32]), "flat_shape"),
        numpy_helper.from_array(np.ones(3, np.float32), "unused_weight"),  # not the fold's
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 5, 32]) for n in "qkv"]
    names = ["y"] + ([extra_output] if extra_output else [])
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    graph = helper.make_graph(nodes, "attention", io, out, shapes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def test_fold_head_reshapes_gives_the_same_attention_in_one_node():
    model = _attention_graph()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((3, 5, 32), dtype=np.float32) for n in "qkv"}

    def run(proto):
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)[0]

    expected = run(model)
    assert fold_head_reshapes(model.graph) == 1
    assert [node.op_type for node in model.graph.node] == ["Attention"]
    assert list(model.graph.node[0].input) == ["q", "k", "v"]
    # The shape constants went with their Reshapes; other initializers stay.
    assert [t.name for t in model.graph.initializer] == ["unused_weight"]
    np.testing.assert_allclose(run(model), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "graph",
    [
        dict(perm=(0, 1, 2, 3)),  # not the (B, S, H, D) -> (B, H, S, D) split
        dict(heads_shape=(-1, 4, 5, 8)),  # (B, H, S, D): the channels are not (heads, dim)
        dict(heads_shape=(-1, 5, 0, 8)),  # a copied dim: no head count to read
        dict(extra_output="kt"),  # a tensor the rewrite would remove is a graph output
    ],
    ids=["perm", "heads-first", "zero-heads", "graph-output"],
)
def test_fold_head_reshapes_leaves_other_graphs_alone(graph):
    model = _attention_graph(**graph)
    before = model.SerializeToString()
    assert fold_head_reshapes(model.graph) == 0
    assert model.SerializeToString() == before
