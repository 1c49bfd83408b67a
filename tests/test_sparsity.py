import pytest
import torch

from sparsellm.sparsity import SparsityError, SparsityPattern, satisfies_nm, zero_fraction


@pytest.mark.parametrize("text, fraction, n, m", [("0.7", 0.7, None, None), ("70%", 0.7, None, None),
                                                  ("3:4", 0.75, 3, 4), ("2:4", 0.5, 2, 4), ("1:16", 1 / 16, 1, 16)])
def test_parse(text, fraction, n, m):
    pattern = SparsityPattern.parse(text)
    assert pattern.fraction == pytest.approx(fraction)
    assert (pattern.n, pattern.m) == (n, m)


@pytest.mark.parametrize("text", ["1.0", "-0.1", "4:4", "5:4", "0:4", "a:b", "abc", "1:32"])
def test_parse_rejects(text):
    with pytest.raises(SparsityError):
        SparsityPattern.parse(text)


def test_nm_shape_check():
    with pytest.raises(SparsityError, match="multiple of 4"):
        SparsityPattern.parse("2:4").check_shape(10)


def test_counting():
    w = torch.randn(8, 16)
    w[:, ::4] = 0
    assert zero_fraction(w) == pytest.approx(0.25)
    assert satisfies_nm(w, 1, 4) and not satisfies_nm(w, 2, 4)
