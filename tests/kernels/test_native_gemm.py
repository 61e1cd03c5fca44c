"""The native few-row GEMM against the reference linear (float64 ground truth), odd shapes included."""
from __future__ import annotations

import pytest
import torch

from llmc.kernels.cpu import native
from llmc.kernels.reference.dense import linear as reference_linear


def test_library_builds_here():
    assert native.library() is not None, native.status()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 15), (4, 16), (7, 17), (64, 100), (130, 576), (33, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    assert native.applies(x, w)
    out = native.linear(x, w, b)
    exact = reference_linear(x.double(), w.double(), None if b is None else b.double())
    ref = reference_linear(x, w, b)
    # fp32 sums of k products in another order: both within a few ulp of sqrt(k)-sized values
    tol = dict(rtol=1e-5, atol=1e-6 * k ** 0.5 * 4)
    torch.testing.assert_close(out, exact.float(), **tol)
    torch.testing.assert_close(out, ref, **tol)


def test_does_not_apply_outside_its_domain():
    w = torch.randn(8, 16)
    assert not native.applies(torch.randn(native.MAX_ROWS + 1, 16), w)
    assert not native.applies(torch.randn(2, 16, dtype=torch.float64), w.double())
    assert not native.applies(torch.randn(16, 2).t(), w)                 # non-contiguous rows
