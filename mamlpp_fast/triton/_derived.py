"""Data derived from a tensor's values and kept on the tensor (a leaf module, importable without triton).

The Triton convolutions keep a re-laid copy of each weight tensor they read (`conv.relaid_weights`);
the fast learner hands the same fast weight to several ops as separate alias objects
(mamlpp_fast.ops.fanout), which must find one another's copies. Both go through this module: one dict
per tensor, under one attribute, which `share_views` makes common to a tensor and its aliases.

Only tensors computed in an autograd graph (`grad_fn` set) keep anything: a leaf, such as a parameter,
can be changed through `.data`, which its version counter does not see; inference tensors have no
version counter. Entries are stored with the version counter's value and ignored once it moves (an
alias made by a view shares its source's counter)."""
from __future__ import annotations

_ATTR = "_mamlpp_derived"


def keeps(t) -> bool:
    """Whether t may keep derived data (module docstring)."""
    return t.grad_fn is not None and not t.is_inference()


def derived(t) -> dict | None:
    """The dict of data derived from t (created on first use), or None when t keeps nothing."""
    return t.__dict__.setdefault(_ATTR, {}) if keeps(t) else None


def share_views(srcs, aliases) -> None:
    """Make aliases[k] use the dict of srcs[k % n] (n = len(srcs)) where both may keep data. Only for
    aliases that are views of their source over the very same elements, and so share its version
    counter, by construction: what mamlpp_fast.ops.fanout's node returns (``t.view_as(t)``). Nothing is
    compared (storage, offset, strides: per alias such checks cost more host time than the rest of the
    fan-out), and each source's dict is looked up once."""
    n = len(srcs)
    dicts = [derived(t) for t in srcs]
    for k, alias in enumerate(aliases):
        d = dicts[k % n]
        if d is not None and alias.grad_fn is not None:
            alias.__dict__[_ATTR] = d
