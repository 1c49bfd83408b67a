import pytest
import torch

from sparsellm.sparsity import SparsityError, SparsityPattern, pruned_count, satisfies_nm, zero_fraction


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


def test_nm_violations_counts_groups_short_of_n_zeros():
    """What the exports check a checkpoint's N:M claim with (export/checkpoint.py, sparse_gpu.py,
    semi_structured.py): groups of M consecutive inputs per row with fewer than N zeros, -1 where
    M does not divide the row (and then satisfies_nm is False, never vacuously True)."""
    from sparsellm.sparsity import nm_violations

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 16, generator=g)
    groups = w.view(5, 4, 4)
    order = torch.rand(5, 4, 4, generator=g).argsort(-1)
    groups.scatter_(-1, order[..., :2], 0.0)  # exactly 2 zeros in every group: 2:4
    assert nm_violations(w, 2, 4) == 0 and satisfies_nm(w, 2, 4) and satisfies_nm(w, 1, 4)
    assert nm_violations(w, 3, 4) == 20 and not satisfies_nm(w, 3, 4)
    w[1, 4:8] = torch.tensor([1.0, -0.0, 2.0, 3.0])  # one group left with one zero (-0.0 counts)
    w[3, 12:16] = 1.0                                # and one with none
    assert nm_violations(w, 2, 4) == 2 and not satisfies_nm(w, 2, 4)
    assert nm_violations(w, 1, 4) == 1
    assert nm_violations(w[:, :14], 1, 4) == -1 and not satisfies_nm(torch.zeros(2, 6), 2, 4)


def test_zero_fraction_pools_entries_and_reaches_sparsity_allows_one_per_row():
    from sparsellm.sparsity import reaches_sparsity

    a = torch.tensor([[0.0, -0.0, 1.0, 2.0]])        # 2 of 4
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # 1 of 8
    assert zero_fraction(a) == 0.5 and zero_fraction(a, b) == pytest.approx(3 / 12)  # not (0.5 + 0.125) / 2
    assert zero_fraction() == 0.0 and zero_fraction(torch.empty(0, 3)) == 0.0
    # rounded down per row: 90% of a 4096-wide row keeps 3686 of 4096 zeros, 0.89990...
    share = int(4096 * 0.9) / 4096
    assert share < 0.9 and reaches_sparsity(share, 0.9, 4096)
    assert not reaches_sparsity(0.9 - 1.5 / 4096, 0.9, 4096)
    assert reaches_sparsity(0.5, 0.5, 0) and not reaches_sparsity(0.48, 0.5, 64)  # 0.5 - 1/64 = 0.484


@pytest.mark.parametrize("size, fraction, expected", [(100, 0.29, 29), (100, 0.57, 57), (1536, 0.3, 460),
                                                      (576, 0.7, 403), (10, 0.0, 0), (7, 0.999, 6)])
def test_pruned_count_floors_the_product_it_stands_for(size, fraction, expected):
    # 0.29 x 100 and 0.57 x 100 land just below 29 and 57 in floating point: int() would give 28 and 56
    assert pruned_count(size, fraction) == expected


def test_masks_prune_the_counted_entries_where_the_float_product_falls_short():
    from sparsellm import reference
    from sparsellm.allocation import uniform_counts
    assert int(100 * 0.29) == 28  # the case this guards against (float rounding, not the rule)
    weight, norm = torch.randn(3, 100), torch.rand(100) + 0.5
    assert reference.wanda_prune_mask(weight, norm, 0.29).sum(1).tolist() == [29, 29, 29]
    diag = torch.rand(100) + 0.5
    assert int(reference.obs_unstructured_mask(weight[:1], diag, 0.29).sum()) == 29
    assert uniform_counts(0.29, [100, 200]) == [29, 58]
