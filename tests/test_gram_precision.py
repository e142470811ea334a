"""bench.gram_precision (the float32 rounding of the fused block's Gram-based batch-norm statistics, which
bench/NOTES.md quotes at the full mini-ImageNet shape): on a small shape its errors are below the block
tests' float32 margin (2e-5) for every image kind, and are not zero (float32 was used); a bad command
line gets the usage line."""
from bench import gram_precision as gp


def test_gram_statistics_errors_are_small_but_not_zero():
    for kind in ("normal", "uniform", "offset"):
        ri, me = gp.errors(kind, chunk=100, n=2, size=12, channels=4)
        assert 0 < ri < 2e-5 and 0 <= me < 2e-5, (kind, ri, me)


def test_usage(capsys):
    assert gp.main(["--chunk", "x"]) == 2 and "usage" in capsys.readouterr().err
    assert gp.main(["--bad"]) == 2
