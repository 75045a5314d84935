"""Rewrites of an exported ONNX graph that keep it in standard operators and make it faster
to run (source/export.py applies them to every export).

    from onnx_graph import fold_head_reshapes
    fold_head_reshapes(model_proto.graph)   # -> how many Attention nodes were rewritten

What the fold expects of the model: attention.py splits q, k and v into heads with
`unflatten(-1, (heads, head_dim)).transpose(1, 2)` after one `chunk` of the fused qkv
projection (timm's strides). The exporter writes that as a plain Split-Reshape-Transpose, the
pattern below; timm's 5-D reshape-permute-unbind would leave six Slice/Squeeze ops a block
instead, which this fold does not match. tests/test_export.py checks the exported graph.
"""

from __future__ import annotations

from types import SimpleNamespace


def fold_head_reshapes(graph) -> int:
    """Feed each Attention node the (B, S, heads * head_dim) tensors themselves.

    The exporter gives Attention (opset 23) 4-D inputs: q, k and v each pass a Reshape to
    (B, S, heads, head_dim) and a Transpose to (B, heads, S, head_dim), and the output goes
    back through a Transpose and a Reshape. Attention takes 3-D tensors with q_num_heads and
    kv_num_heads as well, which is the same computation in one node instead of nine (about
    a fifth of a small model's nodes). Only that exact pattern is rewritten: known 3-D
    sources whose width is heads * head_dim, no other consumers of what is removed, no
    graph outputs among it. Returns the number of Attention nodes rewritten."""
    from onnx import helper

    ix = graph_index(graph)
    rewritten, removed = 0, []
    for attention in list(graph.node):
        if attention.op_type != "Attention" or attention.domain not in ("", "ai.onnx"):
            continue
        names = {a.name for a in attention.attribute}
        if len(attention.input) != 3 or len(attention.output) != 1 or "q_num_heads" in names:
            continue  # masks, past keys, extra outputs or 3-D already: leave as exported
        inputs = [split_heads(ix, name, attention) for name in attention.input]
        merge = only_consumer(ix, attention.output[0], "Transpose")
        flatten = merge and perm_0213(merge) and only_consumer(ix, merge.output[0], "Reshape")
        if None in inputs or not flatten:
            continue
        (q, q_heads, _, q_nodes), (k, kv_heads, _, k_nodes), (v, v_heads, v_dim, v_nodes) = inputs
        flat = ix.shapes.get(flatten.input[1])
        if kv_heads != v_heads or flat is None or len(flat) != 3 or flat[2] != q_heads * v_dim:
            continue
        nodes = q_nodes + k_nodes + v_nodes + [merge]
        if ix.outputs & {name for node in nodes for name in node.output}:
            continue
        attention.ClearField("input")
        attention.input.extend([q, k, v])
        attention.output[0] = flatten.output[0]
        attention.attribute.extend(
            [
                helper.make_attribute("q_num_heads", int(q_heads)),
                helper.make_attribute("kv_num_heads", int(kv_heads)),
            ]
        )
        removed += nodes + [flatten]
        rewritten += 1
    constants = {node.input[1] for node in removed if node.op_type == "Reshape"}
    for node in removed:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | ix.outputs
    for tensor in [t for t in graph.initializer if t.name in constants - used]:
        graph.initializer.remove(tensor)
    return rewritten


def graph_index(graph) -> SimpleNamespace:
    """What the fold looks up: each tensor's producer and consumers, the constant shape
    operands of Reshape, the static dims the exporter recorded, the graph's outputs."""
    from onnx import TensorProto, numpy_helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    overridable = {i.name for i in graph.input}  # an initializer a caller may feed
    return SimpleNamespace(
        producer={out: node for node in graph.node for out in node.output},
        consumers=consumers,
        shapes={  # small int64 vectors
            t.name: numpy_helper.to_array(t).tolist()
            for t in graph.initializer
            if t.data_type == TensorProto.INT64
            and len(t.dims) == 1
            and t.dims[0] <= 8
            and t.name not in overridable
        },
        dims={  # None where symbolic, as the batch
            info.name: [
                d.dim_value if d.HasField("dim_value") else None
                for d in info.type.tensor_type.shape.dim
            ]
            for info in [*graph.value_info, *graph.input]
        },
        outputs={o.name for o in graph.output},
    )


def only_consumer(ix, name: str, op_type: str):
    nodes = ix.consumers.get(name, [])
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def perm_0213(node) -> bool:
    from onnx import helper

    perm = [helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"]
    return perm == [[0, 2, 1, 3]]


def split_heads(ix, name: str, attention):
    """(source, heads, head_dim, removed nodes) for Reshape(source) -> Transpose -> attention,
    None for anything else."""
    transpose = ix.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or not perm_0213(transpose):
        return None
    reshape = ix.producer.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape" or ix.consumers[name] != [attention]:
        return None
    if ix.consumers[transpose.input[0]] != [transpose]:
        return None
    shape, source = ix.shapes.get(reshape.input[1]), ix.dims.get(reshape.input[0])
    if shape is None or len(shape) != 4 or source is None or len(source) != 3:
        return None
    _, tokens, heads, head_dim = shape
    if heads <= 0 or head_dim <= 0 or source[2] != heads * head_dim:
        return None  # not a split of the channels into (heads, head_dim)
    if source[1] is not None and tokens not in (source[1], 0, -1):
        return None
    return reshape.input[0], heads, head_dim, [reshape, transpose]
