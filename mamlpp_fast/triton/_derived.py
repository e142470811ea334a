"""Data derived from a tensor's values and kept on the tensor (a leaf module, importable without triton).

The Triton convolutions keep a re-laid copy of each weight tensor they read (`conv.relaid_weights`);
the fast learner hands the same fast weight to several ops as separate alias objects
(mamlpp_fast.ops.fanout), which must find one another's copies. Both go through this module: one dict
per tensor, under one attribute, which `share` makes common to a tensor and its aliases.

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


def share(src, alias) -> bool:
    """Make alias (a second tensor object over src's very elements: same storage, offset, shape and
    strides, and so the same version counter) use src's dict. Returns whether it did."""
    if alias is src or not (keeps(src) and keeps(alias)):
        return False
    if (alias.data_ptr() != src.data_ptr() or alias.shape != src.shape or alias.stride() != src.stride()
            or alias.dtype != src.dtype or alias.device != src.device or alias._version != src._version):
        return False
    alias.__dict__[_ATTR] = derived(src)
    return True
