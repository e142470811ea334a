"""Benchmarks of mamlpp-fast: `python -m bench.run` from the repository root, see bench/NOTES.md.

Modules: run (entry point), workloads (shapes and batches), flops (analytic FLOP count and the
FlopCounterMode cross-check), baseline_torchfunc (torch.func + vmap MAML++), baseline_jax (JAX MAML++),
bench_learner (pytest-benchmark entries). Importing this package imports nothing heavy.
"""
