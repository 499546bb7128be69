"""ATen graphs for curvature backpropagation: tracing, activity, and one rule family per node.

# NOTE [curvature families]
Curvature backpropagation needs, for every node ``z = op(a_1, ..., a_k)`` of the
graph, two things: its transposed Jacobian (any op: a VJP) and its *residual*
local Hessian ``R = sum_j g_j d^2 z_j / da^2`` (``g`` is the gradient flowing into
``z``). The residual is what differs between ops, so nodes are sorted into
families by how ``R`` looks, never by layer type:

- ``"linear"``: jointly linear in the active inputs (views, data movement, sums,
  ``add``/``sub``, products where only one factor depends on the parameters).
  ``R = 0``.
- ``"piecewise"``: piecewise linear (``relu``, ``max_pool``, ``amax``, ``clamp``,
  ...). ``R = 0`` almost everywhere, which is the value autograd's Hessian has too.
- ``"pointwise"``: elementwise ops with a nonzero second derivative (``tanh``,
  ``exp``, ``div`` by an active tensor, ...). ``R`` is block diagonal over elements.
- ``"bilinear"``: products of two active factors (``mul``, ``mm``, ``bmm``,
  ``convolution``). ``R`` only couples the two factors.
- ``"general"``: anything else; ``R`` is formed densely from ``torch.func.hessian``
  (exact, for ops with small inputs).

Graphs are traced with ``make_fx`` in fake mode, so value-dependent Python control
flow raises instead of being silently baked in, and composite ops (softmax,
layer norm, GELU, ...) are decomposed into the families above.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import tree_flatten, tree_unflatten

from hesse.sparsity._tracing import CURVATURE_DECOMPOSITIONS as DECOMPOSITIONS
from hesse.sparsity._tracing import make_graph

aten = torch.ops.aten


class UnsupportedGraph(RuntimeError):
    """The model could not be traced, or holds an op that curvature propagation cannot handle."""


def trace(fn: Callable[..., torch.Tensor], *args: Any) -> fx.GraphModule:
    """Trace ``fn(*args)`` to an ATen graph (fake tensors, composite ops decomposed) with
    the one tracer of :mod:`hesse.sparsity._tracing` and the curvature decompositions."""
    try:
        try:
            gm = make_graph(fn, *args, decompositions=DECOMPOSITIONS)
        except GuardOnDataDependentSymNode as err:
            # Some libraries (transformers' mask builders) skip value-dependent checks
            # only when they see fake tensors, which functionalisation wraps; a graph
            # without in-place ops needs no functionalisation, so trace it plainly.
            gm = make_graph(fn, *args, decompositions=DECOMPOSITIONS, functional=False)
            if any(_mutates(node) for node in gm.graph.nodes):
                raise err from None
    except Exception as err:  # noqa: BLE001 - any tracing failure is reported with its cause
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UnsupportedGraph(f"tracing failed ({type(err).__name__}: {first})") from err
    _drop_overwrites(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _drop_overwrites(graph: fx.Graph) -> None:
    """Replace ``copy_(dst, src)`` on an intermediate ``dst`` by ``src``.

    Some decompositions (``masked_fill_`` in label-smoothed cross-entropy) emit an
    in-place ``copy_`` that functionalisation does not remove. When the copy
    overwrites all of an intermediate that nothing reads afterwards, its value is
    ``src`` (cast and broadcast), which keeps the graph functional.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.target is not aten.copy_.default:
            continue
        dst, src = node.args[0], node.args[1]
        if not isinstance(dst, fx.Node) or dst.op != "call_function":
            continue
        if any(order[u] > order[node] for u in dst.users if u is not node):
            continue
        dv, sv = dst.meta.get("val"), getattr(src, "meta", {}).get("val")
        if dv is None or sv is None or sv.shape != dv.shape or sv.dtype != dv.dtype:
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)


def _names(*ops: Any) -> frozenset[str]:
    return frozenset(op if isinstance(op, str) else op.__name__ for op in ops)


# Jointly linear in their tensor inputs (and 0/1 Jacobian entries unless in SCALED).
LINEAR = _names(
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze",
    "unsqueeze", "select", "slice", "clone", "alias", "_to_copy", "contiguous", "cat",
    "stack", "index", "index_select", "gather", "constant_pad_nd", "diagonal", "flip",
    "roll", "repeat", "split", "split_with_sizes", "unbind", "narrow", "sum", "mean",
    "add", "sub", "neg", "rsub", "cumsum", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "lift_fresh_copy", "as_strided", "expand_copy", "view_copy", "permute_copy",
    "squeeze_copy", "unsqueeze_copy", "slice_scatter", "select_scatter", "tril", "triu",
    "masked_fill", "where", "unfold", "col2im", "im2col", "pixel_shuffle",
    "pixel_unshuffle", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
    "replication_pad2d", "upsample_nearest2d", "scatter_add", "index_add", "trace",
    "movedim", "unflatten", "flatten", "_reshape_alias", "squeeze_dims", "embedding",
)  # fmt: skip
# NOTE [parameter sinks]
# A parameter used exactly once, reached only through ops that merely rearrange its
# elements, is a "sink": every column reaches it through one node, so the squares
# can be summed at that node without materialising one parameter-sized gradient
# per column (for ``mm`` the sum of squares of the outer products x u_c^T is
# (x^2)^T (sum_c s_c u_c^2), BackPACK's trick for linear layers).
BIJECTIVE = _names(
    "permute", "t", "transpose", "view", "_unsafe_view", "reshape", "clone", "alias",
    "contiguous", "squeeze", "unsqueeze", "lift_fresh_copy", "squeeze_dims",
)  # fmt: skip
# Piecewise linear: zero second derivative almost everywhere.
PIECEWISE = _names(
    "relu", "leaky_relu", "hardtanh", "clamp", "clamp_min", "clamp_max", "abs",
    "maximum", "minimum", "fmax", "fmin", "amax", "amin", "max", "min",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "threshold", "sort", "topk", "sign", "floor", "ceil", "round", "trunc", "relu6",
    "hardshrink", "softshrink", "prelu", "_prelu_kernel", "adaptive_max_pool2d",
)  # fmt: skip
# Products: op name -> (factor argument positions, additive argument positions).
PRODUCTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mul": ((0, 1), ()),
    "mm": ((0, 1), ()),
    "bmm": ((0, 1), ()),
    "mv": ((0, 1), ()),
    "dot": ((0, 1), ()),
    "addmm": ((1, 2), (0,)),
    "baddbmm": ((1, 2), (0,)),
    "convolution": ((0, 1), (2,)),
}
# Ops whose output never depends differentiably on the input.
CONSTANT = _names(
    "detach", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
    "new_ones", "new_full", "new_empty", "scalar_tensor", "full", "zeros", "ones",
    "arange", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "isnan", "isinf", "argmax", "argmin", "bernoulli", "rand_like",
    "randn_like", "empty", "empty_strided",
)  # fmt: skip


def op_name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


@dataclass
class NodeInfo:
    """What curvature propagation needs to know about one call node."""

    node: fx.Node
    name: str
    family: str  # see NOTE [curvature families]
    active: list[int]  # positions (in the flattened args) that carry active tensors
    leaves: list[Any]  # flattened (args, kwargs) with fx.Node leaves
    spec: Any
    factors: tuple[int, ...] = ()  # positions (flat) of active product factors
    deps: frozenset[int] = field(default_factory=frozenset)

    def call(self, env: dict[fx.Node, Any], override: dict[int, Any] | None = None) -> Any:
        """Run the node on the values in ``env``, replacing flat leaves in ``override``."""
        vals = []
        for i, leaf in enumerate(self.leaves):
            if override is not None and i in override:
                vals.append(override[i])
            elif isinstance(leaf, fx.Node):
                vals.append(env[leaf])
            else:
                vals.append(leaf)
        args, kwargs = tree_unflatten(vals, self.spec)
        if self.node.target is operator.getitem:
            return args[0][args[1]]
        return self.node.target(*args, **kwargs)


@dataclass
class Plan:
    """A traced graph annotated for curvature propagation."""

    gm: fx.GraphModule
    placeholders: list[fx.Node]
    targets: list[int]  # placeholder positions whose curvature is wanted
    order: list[NodeInfo]  # call nodes in topological order
    info: dict[fx.Node, NodeInfo]
    deps: dict[fx.Node, frozenset[int]]  # which targets each node depends on
    output: fx.Node
    users: dict[fx.Node, int]  # number of active uses of each node
    sinks: set[fx.Node]  # NOTE [parameter sinks]


def _is_float(meta_val: Any) -> bool:
    vals, _ = tree_flatten(meta_val)
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def plan(gm: fx.GraphModule, targets: list[int]) -> Plan:
    """Annotate ``gm``: activity (dependence on the target placeholders) and families."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    deps: dict[fx.Node, frozenset[int]] = {}
    for i, p in enumerate(placeholders):
        deps[p] = frozenset([i]) if i in targets else frozenset()
    order: list[NodeInfo] = []
    info: dict[fx.Node, NodeInfo] = {}
    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            (output,) = tree_flatten(node.args)[0][:1]
            continue
        if node.op == "get_attr":
            deps[node] = frozenset()
            continue
        if node.op != "call_function":
            if node.op != "placeholder":
                raise UnsupportedGraph(f"unexpected graph node {node.op} ({node.target})")
            continue
        leaves, spec = tree_flatten((node.args, node.kwargs))
        name = op_name(node)
        active = [
            i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and deps.get(leaf)
        ]
        d = frozenset().union(*(deps[leaves[i]] for i in active)) if active else frozenset()
        if name in CONSTANT or not _is_float(node.meta.get("val")):
            active, d = [], frozenset()
        deps[node] = d
        family = "constant"
        factors: tuple[int, ...] = ()
        if active:
            family = _family(node, name, active, leaves)
            if name in PRODUCTS:
                factors = tuple(i for i in PRODUCTS[name][0] if i in active)
        ni = NodeInfo(node, name, family, active, leaves, spec, factors, d)
        order.append(ni)
        info[node] = ni
    assert output is not None, "traced graph has no output"
    users: dict[fx.Node, int] = {}
    for ni in order:
        for i in ni.active:
            users[ni.leaves[i]] = users.get(ni.leaves[i], 0) + 1
    sinks = {placeholders[i] for i in targets if users.get(placeholders[i]) == 1}
    for ni in order:
        if (
            ni.name in BIJECTIVE
            and len(ni.active) == 1
            and ni.leaves[ni.active[0]] in sinks
            and users.get(ni.node) == 1
        ):
            sinks.add(ni.node)
    return Plan(gm, placeholders, list(targets), order, info, deps, output, users, sinks)


def _family(node: fx.Node, name: str, active: list[int], leaves: list[Any]) -> str:
    if name == "getitem" or name in LINEAR:
        return "linear"
    if name in PIECEWISE:
        return "piecewise"
    if name in PRODUCTS:
        factors = [i for i in PRODUCTS[name][0] if i in active]
        return "bilinear" if len(factors) == 2 else "linear"
    if name == "div":
        return "pointwise" if 1 in active else "linear"
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return "pointwise"
    return "general"


def sink_chain(p: Plan, leaf: fx.Node) -> tuple[int, list[NodeInfo]]:
    """The target placeholder behind a sink and the rearrangements from it to ``leaf``."""
    chain: list[NodeInfo] = []
    node = leaf
    while node.op != "placeholder":
        ni = p.info[node]
        chain.append(ni)
        node = ni.leaves[ni.active[0]]
    return p.placeholders.index(node), chain[::-1]
