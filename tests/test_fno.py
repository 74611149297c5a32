"""The shared FNO layers (mgno and pihc-moe baselines)."""
import pytest
import torch

from gradkit.nn.fno import FNO2d, SpectralConv2d


def test_spectral_layer_is_linear_and_keeps_only_low_modes():
    torch.manual_seed(0)
    k = SpectralConv2d(width=3, modes=2).double()
    a, b = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(k(2 * a - b), 2 * k(a) - k(b))
    # a pure high-frequency input (Nyquist along both axes) is mapped to zero
    n = torch.arange(8, dtype=torch.float64)
    hi = ((-1.0) ** n).view(8, 1) * ((-1.0) ** n).view(1, 8)
    assert k(hi.expand(1, 3, 8, 8)).abs().max() < 1e-12


def test_fno_shapes_dtypes_and_errors():
    net = FNO2d(in_channels=3, out_channels=2, width=4, modes=3, layers=2, padding=2)
    assert net(torch.randn(2, 3, 12, 10)).shape == (2, 2, 12, 10)
    assert net.double()(torch.randn(1, 3, 12, 10, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="modes=3 does not fit"):
        net(torch.randn(1, 3, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="width"):
        FNO2d(3, 1, width=0, modes=2)
    with pytest.raises(ValueError, match="padding"):
        FNO2d(3, 1, width=4, modes=2, padding=-1)
