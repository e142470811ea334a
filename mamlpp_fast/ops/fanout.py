r"""Fan-out of tensors that several ops read: one alias per use, and the uses' gradients summed in one node.

Autograd sums the gradients of a tensor over the nodes that read it one addition at a time, each a
kernel launch of its own, as the gradients arrive. In the fast learner's unrolled inner loop every fast
weight is read three or four times (the target forward of its step, the support forward and LSLR update
of the next step, and the support backward built for the second-order derivative) and every per-step
batch-norm row two or three times, so those additions were ~150 of a meta-update's launches.

`fanout(uses, tensors)` returns ``uses`` lists of aliases (views, no copy) of ``tensors``; each list is
meant to feed one use. Its backward receives the gradient of every alias and returns, for tensor j::

    d tensors[j] = sum_u d aliases[u][j]        (undefined terms left out; None when all are)

formed in one launch for all tensors where the Triton kernel runs (mamlpp_fast/triton/fanout.py; the
gradients of each tensor in one layout), else with one multi-tensor addition per use after the first
(``torch._foreach_add``: one launch for all tensors of the group on a CUDA device) instead of one
addition per tensor and use; or, for a few tensors read many times (2 n < uses - 1, every gradient
defined), as a stack and a sum per tensor. The node runs
when all the aliases' gradients are ready, which is when autograd would have finished its additions.

`fanout_rows(tables, uses)`: the same for the per-step rows of (S, C) tables (what ``unbind(0)``
gives); use u reads the tables listed in ``uses[u]``. Backward, for table t::

    d tables[t][s] = sum over the uses u that read t of d rows[u][t][s]

written row by row by one launch of the Triton sum where it runs, else with the rows of all equally
shaped tables read by the same uses stacked per use (one launch each) and the stacks added (one launch
each after the first), where ``unbind`` gave one stack per table and autograd one addition per row and
extra use. A use whose rows are only partly differentiated (the target pass after the MSL
epochs reads the rows of the last step only) is stacked per step.

The ops whose backward builds a node that reads a parameter again (the second-order backward of
`task_conv2d` with the triton implementation, `bn_pool`, `conv_bn_pool`) take an alias for that read
(``weight_saved``, ``gamma_saved``, ...), so that the parameter's gradient from that node is one more
use summed here rather than an addition of autograd's; `saved_alias` checks it.

Activations are read twice in the same way: a convolution's input by its forward and by the weight
gradient its backward builds, a convolution's output by bn_pool's forward and by the node bn_pool's
backward builds. For the first, the producer (`bn_pool`, `conv_bn_pool`) returns an alias of its output
(``alias=True``), the convolution passes it as the tensor its backward node reads (``input_saved``),
and the producer's backward receives the two gradients as two arguments (`two_gradients`): its kernels
add them where they load the upstream gradient. For the second, bn_pool keeps an alias of its own
input for its backward node, so that the double backward's gradient of the input reaches bn_pool's
backward, whose kernel adds it to dx before storing it (the convolution's kernels, which load their
upstream gradient once per filter tap, would pay for a second one in their inner loops: registers
and spills, bench/NOTES.md). Either way autograd's addition of the two (an activation-sized read,
read and write, and a launch) is gone.

The aliases of a tensor share the data the kernels derive from it and keep on it (the Triton
convolutions' re-laid weight copies, mamlpp_fast.triton._derived), so that a weight read through
three aliases is re-laid once, not three times.

`expand_tasks(b, tensors)` gives each tensor's (b, ...) view repeated over the tasks (what
``t.unsqueeze(0).expand(b, *t.shape)`` gives: step 0's fast weights are the meta-parameters for every
task). Autograd's backward of an expansion is one sum over the tasks per tensor; this node's is, for
the tensors j of one dtype and device whose gradient is defined::

    d tensors[j] = sum_i d expanded[j][i]   (i over the b tasks)

formed in one launch for all tensors where the Triton kernels run (each gradient read in its own
task-major layout, each result written contiguous), else as one sum over the tasks of the gradients
laid side by side as (b, sum_j numel_j) columns: a concatenation and a sum, two launches for all
tensors instead of one per tensor. A gradient whose task
slices are not contiguous (a weight gradient in a convolution kernel's layout) is summed on its own, so
that every result is contiguous like the tensor it belongs to.

None of these nodes is differentiable again (its backward is only run by the outer, first-order backward:
the inner loop's gradients are taken with respect to the aliases).
"""
from __future__ import annotations

import torch

from ..triton._derived import share_views

__all__ = ["expand_tasks", "fanout", "fanout_rows", "fanout_kernels", "saved_alias", "two_gradients"]


def saved_alias(op: str, name: str, p, alias):
    """The tensor an op's backward should read for its argument `name` = p: `alias` (an alias of p made
    by `fanout`, for the ops that take one) when given, else p. A mismatch is the caller's error."""
    if alias is None or p is None:
        if alias is not None:
            raise ValueError(f"{op}: {name}_saved was given but {name} is None")
        return p
    if not isinstance(alias, torch.Tensor):
        raise TypeError(f"{op}: {name}_saved must be a torch.Tensor, got {type(alias).__name__}")
    if alias.shape != p.shape or alias.dtype != p.dtype or alias.device != p.device:
        raise ValueError(f"{op}: {name}_saved ({tuple(alias.shape)}, {alias.dtype}, {alias.device}) must be an "
                         f"alias of {name} ({tuple(p.shape)}, {p.dtype}, {p.device})")
    return alias


def two_gradients(g, g2):
    """What the backward of an op with an output alias reads, given the gradients g of the output and g2
    of its alias (either may be None): (g, g2) with g None only when both are. Where the backward is
    recorded for a further derivative (grad mode on: the inner loop's create_graph=True), their sum
    and None, so that the recorded nodes depend on one gradient; where it is not (the meta-update's
    outer, first-order backward), both, for the kernels to add where they load the gradient."""
    if g is None:
        return g2, None
    if g2 is not None and torch.is_grad_enabled():
        return g + g2, None
    return g, g2


def fanout_kernels(t: torch.Tensor):
    """The one-launch Triton sums (the module mamlpp_fast.triton.fanout: `sum_uses`, `sum_tasks`) for
    gradients like t, or None where they do not run: on a CUDA device when Triton is available, and on a
    CPU under TRITON_INTERPRET=1 (the interpreter's tests)."""
    from .. import triton as tb
    from ..triton._device import _interpret
    if not (t.device.type == "cuda" or (t.device.type == "cpu" and _interpret())) or not tb.is_available():
        return None
    from ..triton import fanout as kernels
    return kernels


def _sum_uses(per_use: list[list], n: int) -> list:
    """Element-wise sums over the uses of n gradients; per_use[u][j] may be None. Where the Triton
    kernel runs (`fanout_kernels`) and every tensor's gradients share their layout: one launch for all
    tensors, the same sums bitwise. Otherwise one multi-tensor addition per use after the first, or,
    with every gradient defined and 2 n < uses - 1 (few tensors read many times: the learning-rate
    table, once per step), each tensor's gradients stacked and summed (2 launches per tensor)."""
    k = len(per_use)
    first = next((g for grads in per_use for g in grads if g is not None), None)
    kernels = fanout_kernels(first) if first is not None else None
    if kernels is not None:
        groups = [[grads[j] for grads in per_use if grads[j] is not None] for j in range(n)]
        multi = [j for j in range(n) if len(groups[j]) >= 2]
        if multi and all(kernels.summable(groups[j]) for j in multi):
            out = [g[0] if len(g) == 1 else None for g in groups]
            for j, total in zip(multi, kernels.sum_uses([groups[j] for j in multi])):
                out[j] = total
            return out
    if 2 * n < k - 1 and all(g is not None for grads in per_use for g in grads):
        return [torch.stack([grads[j] for grads in per_use]).sum(0) for j in range(n)]
    acc: list = [None] * n
    owned = [False] * n  # acc[j] is a buffer this node created (safe to add into in place)
    for grads in per_use:
        idx = [j for j in range(n) if grads[j] is not None]
        if not idx:
            continue
        fresh = [j for j in idx if acc[j] is None]
        for j in fresh:
            acc[j] = grads[j]
        both = [j for j in idx if j not in fresh]
        if not both:
            continue
        inplace = [j for j in both if owned[j]]
        outplace = [j for j in both if not owned[j]]
        if outplace:
            sums = torch._foreach_add([acc[j] for j in outplace], [grads[j] for j in outplace])
            for j, s in zip(outplace, sums):
                acc[j], owned[j] = s, True
        if inplace:
            torch._foreach_add_([acc[j] for j in inplace], [grads[j] for j in inplace])
    return acc


class _Fanout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, uses: int, *tensors):
        ctx.set_materialize_grads(False)
        ctx.n = len(tensors)
        ctx.uses = uses
        return tuple(t.view_as(t) for _ in range(uses) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = ctx.n
        return (None, *_sum_uses([list(grads[u * n:(u + 1) * n]) for u in range(ctx.uses)], n))


def fanout(uses: int, tensors: list) -> list[list]:
    """``uses`` lists of aliases of ``tensors`` (module docstring); each alias should feed one use."""
    if uses < 1:
        raise ValueError(f"fanout: uses must be >= 1, got {uses}")
    tensors = list(tensors)
    if not tensors:
        return [[] for _ in range(uses)]
    flat = _Fanout.apply(uses, *tensors)
    n = len(tensors)
    share_views(tensors, flat)  # one set of kept re-laid copies for a tensor and its aliases
    return [list(flat[u * n:(u + 1) * n]) for u in range(uses)]


class _FanoutRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, uses: tuple, *tables):
        ctx.set_materialize_grads(False)
        ctx.shapes = [tuple(t.shape) for t in tables]
        ctx.uses = uses
        return tuple(r.view_as(r) for use in uses for t in use for r in tables[t].unbind(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        shapes = ctx.shapes
        # cell[u][t][s]: the gradient of use u's alias of row s of table t (None where u does not read t)
        cells: list = []
        pos = 0
        for use in ctx.uses:
            per = [None] * len(shapes)
            for t in use:
                per[t] = grads[pos:pos + shapes[t][0]]
                pos += shapes[t][0]
            cells.append(per)
        by_kernel = _rows_by_kernel(cells, shapes, grads)
        if by_kernel is not None:
            return (None, *by_kernel)
        groups: dict = {}  # tables of one shape read by the same uses are summed as one (T, S, C) stack
        for t, s in enumerate(shapes):
            groups.setdefault((s, tuple(u for u, use in enumerate(ctx.uses) if t in use)), []).append(t)
        out: list = [None] * len(shapes)
        for (shape, _), tabs in groups.items():
            acc = None  # (len(tabs), *shape)
            for per in cells:
                rows = [per[t] if per[t] is not None else (None,) * shape[0] for t in tabs]
                if all(g is not None for r in rows for g in r):  # the whole group: one stack, one addition
                    stacked = torch.stack([g for r in rows for g in r]).view(len(tabs), *shape)
                    acc = stacked if acc is None else acc.add_(stacked)
                    continue
                for s in range(shape[0]):
                    col = [r[s] for r in rows]
                    if all(g is None for g in col):
                        continue
                    if acc is None:
                        acc = next(g for g in col if g is not None).new_zeros((len(tabs), *shape))
                    if all(g is not None for g in col):  # one step of every table: one stack, one addition
                        acc[:, s].add_(torch.stack(col))
                        continue
                    for k, g in enumerate(col):
                        if g is not None:
                            acc[k, s].add_(g)
            if acc is not None:
                for k, t in enumerate(tabs):
                    out[t] = acc[k]
        return (None, *out)


def _rows_by_kernel(cells: list, shapes: list, grads) -> list | None:
    """The tables' gradients written row by row by one launch of the Triton sum (`fanout_kernels`): row s
    of table t is the sum, in use order, of the defined gradients of its aliases (zeros where none is); a
    table none of whose rows has a gradient gets None. None (the caller stacks instead) where the kernel
    does not run or a row's gradients are not all of one dense layout."""
    first = next((g for g in grads if g is not None), None)
    kernels = fanout_kernels(first) if first is not None else None
    if kernels is None:
        return None
    summable = kernels.summable
    result: list = [None] * len(shapes)
    groups, outs = [], []
    for t, shape in enumerate(shapes):
        per_row = [[per[t][s] for per in cells if per[t] is not None and per[t][s] is not None]
                   for s in range(shape[0])]
        defined = next((g[0] for g in per_row if g), None)
        if defined is None:
            continue
        out = defined.new_empty(shape)
        for s, row in enumerate(per_row):
            if row and not summable([out[s], *row]):
                return None
            groups.append(row)
            outs.append(out[s])
        result[t] = out
    if groups:
        kernels.sum_uses(groups, outs)
    return result


def fanout_rows(tables: list, uses: list) -> list[list[tuple]]:
    """Row aliases of (S, C) tables for several uses (module docstring). ``uses[u]`` lists the indices
    of the tables that use u reads; the result holds, for each use, the tuple of S row aliases of each
    of those tables, in that order. Each alias should feed one read."""
    tables = list(tables)
    for t, tab in enumerate(tables):
        if not isinstance(tab, torch.Tensor) or tab.dim() < 1 or tab.shape[0] < 1:
            raise ValueError(f"fanout_rows: tables[{t}] must be a tensor with a leading dimension of rows")
    uses = tuple(tuple(int(t) for t in use) for use in uses)
    for u, use in enumerate(uses):
        for t in use:
            if not 0 <= t < len(tables):
                raise ValueError(f"fanout_rows: uses[{u}] names table {t}, but there are {len(tables)}")
        if len(set(use)) != len(use):
            raise ValueError(f"fanout_rows: uses[{u}] names a table twice: {use}")
    if not any(uses):
        return [[] for _ in uses]
    flat = _FanoutRows.apply(uses, *tables)
    out, pos = [], 0
    for use in uses:
        per = []
        for t in use:
            per.append(tuple(flat[pos:pos + tables[t].shape[0]]))
            pos += tables[t].shape[0]
        out.append(per)
    return out


class _ExpandTasks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b: int, *tensors):
        ctx.set_materialize_grads(False)
        ctx.b = b
        return tuple(t.unsqueeze(0).expand(b, *t.shape) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        b = ctx.b
        out: list = [None] * len(grads)
        defined = [j for j, g in enumerate(grads) if g is not None]
        kernels = fanout_kernels(grads[defined[0]]) if defined else None
        if kernels is not None and all(kernels.summable_over_tasks(grads[j]) for j in defined):
            # one launch for every tensor, in any task-major layout, each result contiguous
            for j, total in zip(defined, kernels.sum_tasks([grads[j] for j in defined])):
                out[j] = total
            return (None, *out)
        groups: dict = {}
        for j, g in enumerate(grads):
            if g is not None:
                groups.setdefault((g.dtype, g.device), []).append(j)
        for idx in groups.values():
            # gradients in another layout than the tensor's (a weight gradient in a kernel's own layout)
            # are summed alone: a sum's result is contiguous, the layout of the tensor's other gradients
            # (the fan-out's multi-tensor addition and the parameter's .grad need equal strides); laid
            # side by side they would need a copy each
            dense = [j for j in idx if grads[j].is_contiguous()]
            for j in idx:
                if j not in dense or len(dense) == 1:
                    out[j] = grads[j].sum(0)
            if len(dense) < 2:
                continue
            total = torch.cat([grads[j].reshape(b, -1) for j in dense], 1).sum(0)
            for j, piece in zip(dense, total.split([grads[j][0].numel() for j in dense])):
                out[j] = piece.view(grads[j].shape[1:])
        return (None, *out)


def expand_tasks(b: int, tensors: list) -> list:
    """Each tensor expanded over b tasks as a (b, ...) view; their gradients summed over the tasks in
    one node (module docstring)."""
    if b < 1:
        raise ValueError(f"expand_tasks: b must be >= 1, got {b}")
    tensors = list(tensors)
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expand_tasks: tensors[{j}] must be a torch.Tensor, got {type(t).__name__}")
    if not tensors:
        return []
    return list(_ExpandTasks.apply(b, *tensors))
