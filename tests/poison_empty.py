"""Uninitialised memory made visible (not part of the default run): `poison_empty()` makes every
torch.empty / empty_like / Tensor.new_empty fill its result with NaN (integers 85, booleans True), so that a
kernel reading memory nothing wrote shows it even where a CPU allocator happens to return zeros.

As a pytest plugin (the tests' own assertions then catch it), from the repository root:

    MAMLPP_POISON_EMPTY=1 TRITON_INTERPRET=1 MAMLPP_TRITON_INNER=1 PYTHONPATH=.:tests \\
        python -m pytest -p poison_empty tests/test_triton_interp.py -k "conv_block or bn_pool or head"
"""
import os


def poison_empty():
    import torch
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        t.fill_(float("nan") if t.is_floating_point() else (True if t.dtype == torch.bool else 85))
        return t
    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(new_empty(self, *a, **k))


if os.environ.get("MAMLPP_POISON_EMPTY") == "1":
    poison_empty()
