"""``full.onnx`` cut in two: the work that depends on the request alone, and the work per candidate.

The cpu backend runs a request's candidates in chunks side by side, each chunk a run of ``full.onnx`` with
the request's inputs whole. Every node whose inputs come only from the request's own inputs (sequences,
dense and context features) and the weights then computes the same values in every chunk: the lifelong
sequence dequantised and normalised, TransAct's row share of its first layer, masks and shapes. Cut at
those nodes, the graph becomes a *request stage* (run once per request row) whose outputs are handed to a
*candidate stage* (run per chunk) as extra inputs. The nodes are ONNX Runtime's as before and each sees the
same inputs, so the results are the same values; only where a fusion ONNX Runtime made across the cut can no
longer be made may the last bits differ.

Cheap layout nodes (transposes, reshapes, slices, concatenations) at the edge of the request stage are
computed in the candidate stage instead: handing over their inputs costs nothing, while their outputs would
be materialised once more and can keep ONNX Runtime from fusing them into the product that reads them. So
are the nodes that read weights alone (products of two weight matrices, say): ONNX Runtime folds them into
the candidate stage's weights when it loads it, where handed over they would be computed for every request
and passed in with every chunk (each input of a run costs the calling thread time under Python's lock).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import onnx
from onnx import helper

# Layout-only operators recomputed per candidate chunk rather than handed over (see the module docstring).
LAYOUT_OPS = frozenset({"Constant", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Slice",
                        "Concat", "Expand"})  # fmt: skip


@dataclass(frozen=True)
class RequestStage:
    """The two graphs: ``request`` maps request inputs to the ``handoff`` tensors; ``candidates`` maps the
    original inputs it needs plus ``handoff`` to the original outputs."""

    request: onnx.ModelProto
    candidates: onnx.ModelProto
    handoff: tuple[str, ...]

    @property
    def request_nodes(self) -> int:
        return len(self.request.graph.node)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in (*g.value_info, *g.input, *g.output)}


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names a node reads: its inputs and, for If / Loop / Scan, every name read inside its subgraphs (a superset
    of their outer-scope reads, which is all a cut needs)."""
    names = {x for x in node.input if x}
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sub.node:
                names |= _reads(n)
    return names


def _model(source: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], name: str) -> onnx.ModelProto:  # fmt: skip
    used = set().union(*map(_reads, nodes))  # subgraphs' reads too: a weight only a branch reads stays
    init = [t for t in source.graph.initializer if t.name in used]
    graph = helper.make_graph(nodes, name, inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=source.opset_import, ir_version=source.ir_version,
                              producer_name=source.producer_name, producer_version=source.producer_version)  # fmt: skip
    model.functions.extend(source.functions)
    return model


def _needed(nodes: list[onnx.NodeProto], names: Collection[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes (of ``nodes``, in topological order) that ``names`` need, in that order, and every name they read."""
    need, kept = set(names), []
    for n in reversed(nodes):  # read backwards: every consumer before its producers
        if any(o in need for o in n.output):
            kept.append(n)
            need |= _reads(n)
    return kept[::-1], need


def keep_outputs(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """``model`` cut to the graph outputs ``names``: the nodes they need, the inputs and weights those read."""
    g = model.graph
    kept = [o for o in g.output if o.name in names]
    if missing := set(names) - {o.name for o in kept}:
        raise ValueError(f"the graph has no output(s) {sorted(missing)}")
    nodes, need = _needed(list(g.node), names)
    return _model(model, nodes, [v for v in g.input if v.name in need], kept, g.name)


def split_request_stage(
    model: onnx.ModelProto, per_candidate: Collection[str], layout_ops: Collection[str] = LAYOUT_OPS
) -> RequestStage | None:
    """Cut ``model`` into its request stage and its candidate stage; ``per_candidate`` names the graph inputs
    that differ between chunks (all other inputs are the request's). None when nothing worth a stage of its
    own depends on the request alone, or when the graph holds nodes with subgraphs (If, Loop, Scan), whose
    outer-scope reads this analysis does not follow."""
    g = model.graph
    if any(_has_subgraph(n) for n in g.node):
        return None
    names = {i.name for i in g.input}
    if missing := set(per_candidate) - names:
        raise ValueError(f"the graph has no input(s) {sorted(missing)}")
    # Nodes are in topological order (an ONNX requirement), so one pass finds every node whose inputs are all
    # request inputs, weights or outputs of such nodes.
    weights = {t.name for t in g.initializer}
    known = weights | (names - set(per_candidate))
    hoisted: list[int] = []
    for i, n in enumerate(g.node):
        if all(not x or x in known for x in n.input):
            hoisted.append(i)
            known.update(o for o in n.output if o)
            if all(not x or x in weights for x in n.input):  # computed from the weights alone
                weights.update(o for o in n.output if o)
    producer = {o: i for i in hoisted for o in g.node[i].output if o}
    stay = set(range(len(g.node))) - set(hoisted)
    outputs = {o.name for o in g.output}

    def handoff() -> set[str]:
        made_below = {o for i in stay for o in g.node[i].output}
        needed = {x for i in stay for x in g.node[i].input if x} | outputs
        return {x for x in needed if x in producer and x not in made_below}

    # A graph output computed from the request alone, layout nodes at the edge and what the weights alone give move
    # down (repeatedly: moving one exposes its inputs).
    while moves := {producer[x] for x in handoff()
                    if x in outputs or x in weights or g.node[producer[x]].op_type in layout_ops}:  # fmt: skip
        stay |= moves
    edge = handoff()
    if not edge:
        return None
    # The request stage keeps only what the hand-off needs.
    request_nodes, need = _needed([g.node[i] for i in hoisted], edge)
    if all(n.op_type in layout_ops for n in request_nodes):
        return None
    types = _types(model)
    if any(x not in types for x in edge):
        types = _types(onnx.shape_inference.infer_shapes(model))
        if any(x not in types or not types[x].type.tensor_type.elem_type for x in edge):
            return None
    order = sorted(edge)
    graph_inputs = list(g.input)
    request = _model(model, request_nodes, [v for v in graph_inputs if v.name in need], [types[x] for x in order],
                     "request_stage")
    below = [g.node[i] for i in sorted(stay)]
    used = {x for n in below for x in n.input if x} | outputs
    candidates = _model(model, below, [v for v in graph_inputs if v.name in used] + [types[x] for x in order],
                        list(g.output), "candidate_stage")  # fmt: skip
    return RequestStage(request, candidates, tuple(order))
