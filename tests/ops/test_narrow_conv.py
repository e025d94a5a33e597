"""narrow_conv2d equals conv2d (values and gradients) for few output channels."""

import pytest
import torch
import torch.nn.functional as F

from dynadet.ops.narrow_conv import narrow_conv2d


@pytest.mark.parametrize(("n", "c", "o", "k", "h", "w"),
                         [(1, 8, 1, 3, 7, 5), (2, 5, 3, 3, 1, 1), (3, 4, 2, 5, 6, 9),
                          (1, 3, 1, 1, 4, 4)])
def test_matches_conv2d_and_gradients(n, c, o, k, h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(o, c, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True)
    ours = narrow_conv2d(x, wt, b)
    ref = F.conv2d(x, wt, b, padding=k // 2)
    torch.testing.assert_close(ours, ref)
    assert torch.autograd.gradcheck(lambda *a: narrow_conv2d(*a), (x, wt, b))
    assert torch.autograd.gradcheck(lambda a, b_: narrow_conv2d(a, b_), (x, wt))


def test_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        narrow_conv2d(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2))
