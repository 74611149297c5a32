"""The communication, curvature and leakage components run on any device (CPU here; CUDA where present).

Each test is parametrised over devices, so its logic is exercised on the CPU even where no GPU is.
"""
import pytest
import torch
from torch import nn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA not available"))]


@pytest.mark.parametrize("device", DEVICES)
def test_dgc_compressor_round_trip(device):
    from gradkit.distributed import DGCCompressor

    c = DGCCompressor(density=0.01, momentum=0.9, warmup=None)
    g = torch.randn(64, 32, device=device)
    sg = c.compress("w", g)
    dense = c.decompress([sg], g.shape)
    assert dense.device.type == device and int((dense != 0).sum()) <= sg.values.numel() == 21


@pytest.mark.parametrize("device", DEVICES)
def test_mfac_optimizer_and_fisher_inverse(device):
    from gradkit.curvature import EmpiricalFisherInverse
    from gradkit.optim import MFAC

    torch.manual_seed(0)
    g = torch.randn(8, 50, device=device, dtype=torch.float64)
    inv = EmpiricalFisherInverse(g, damp=1e-2)
    x = torch.randn(50, device=device, dtype=torch.float64)
    dense = 1e-2 * torch.eye(50, device=device, dtype=torch.float64) + g.T @ g / 8
    torch.testing.assert_close(inv.mul(x), torch.linalg.solve(dense, x))
    model = nn.Linear(5, 3).to(device)
    opt = MFAC(model.parameters(), lr=1e-3, ngrads=4)
    before = model.weight.detach().clone()
    model(torch.randn(7, 5, device=device)).square().mean().backward()
    opt.step()
    assert model.weight.device.type == device and not torch.equal(model.weight, before)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_inversion_on_device(device):
    from gradkit.privacy import GradientInversion, InversionPreset, PixelSpace, model_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    x, y = torch.rand(1, 4, 4, device=device), torch.tensor([1], device=device)
    target = model_gradients(model, x, y)
    res = GradientInversion(model, InversionPreset(name="t", iters=20)).run(
        target, y, PixelSpace((1, 4, 4), device=device, generator=torch.Generator().manual_seed(0)))
    assert res.x.device.type == device and res.match_loss <= res.history[0]


@pytest.mark.parametrize("device", DEVICES)
def test_hypernetwork_client_and_dropout_masks(device):
    from gradkit.nn import HyperClient, MaskableDropout

    torch.manual_seed(0)
    client = HyperClient(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), nn.Linear(4, 3), embed_dim=5, hidden=7).to(device)
    out = client(torch.randn(2, 6, device=device))
    out.sum().backward()
    assert out.shape == (2, 3) and all(p.grad is not None for p in client.shared_parameters())
    drop = MaskableDropout(0.5).to(device)
    mask = (torch.rand(2, 6, device=device) > 0.5).float()
    h = torch.randn(2, 6, device=device)
    drop.replay(mask)
    torch.testing.assert_close(drop(h), h * mask / 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_pgd_and_l1_projection(device):
    from gradkit.privacy import project_l1_ball
    from gradkit.probes import InputGradient
    from gradkit.robustness import pgd_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 3)).to(device)
    x, y = torch.randn(5, 10, device=device), torch.randint(0, 3, (5,), device=device)
    a = InputGradient(model).attribute(x, target=y, internal_batch_size=2)
    adv = pgd_attack(model, x, y, eps=0.1, steps=3)
    p = project_l1_ball(torch.randn(4, 9, device=device), 1.0)
    assert a.shape == x.shape and a.device.type == device
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and p.abs().sum(1).max() <= 1.0 + 1e-5
