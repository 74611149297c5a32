import pytest
import torch

from gradkit.generative.invertibility import (FlowMaskHead, InvertibilityDecomposition, blend, error_threshold_mask,
                                              fuse_masks, mask_iou, ood_error_split,
                                              mask_regularizer, warp)
from gradkit.generative.layered import small_generator


def test_warp_zero_flow_is_identity_and_one_pixel_shift():
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    assert torch.allclose(warp(x, torch.zeros(2, 2, 6, 7, dtype=torch.float64)), x, atol=1e-12)
    f = torch.zeros(2, 2, 6, 7, dtype=torch.float64)
    f[:, 0] = 2.0 / (7 - 1)
    assert torch.allclose(warp(x, f)[..., :-1], x[..., 1:], atol=1e-10)


def test_warp_rejects_wrong_flow_shape():
    with pytest.raises(ValueError, match="flow must have shape"):
        warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))


def test_blend_exact_at_0_and_1():
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    assert torch.equal(blend(a, b, torch.ones(2, 1, 4, 4)), a)
    assert torch.equal(blend(a, b, torch.zeros(2, 1, 4, 4)), b)


def test_area_hinge_gradient():
    m = torch.full((1, 1, 4, 4), 0.1, requires_grad=True)
    mask_regularizer(m, area_target=0.2, binary_weight=0.0).backward()
    assert torch.count_nonzero(m.grad) == 0
    m = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    mask_regularizer(m, area_target=0.2, binary_weight=0.0).backward()
    assert torch.allclose(m.grad, torch.full_like(m, 1 / 16))


def test_threshold_mask_hard():
    x = torch.zeros(1, 1, 4, 4)
    r = x.clone()
    r[..., 1, 1] = 1
    m = error_threshold_mask(x, r, tau=0.5, blur=1, temp=0)
    assert m.sum() == 1 and m[0, 0, 1, 1] == 1


def test_head_flow_bound_and_mask_range():
    head = FlowMaskHead(4, enc_channels=3, warp_scale=0.2)
    _, flow, mask = head(torch.randn(2, 3, 8, 8) * 10, torch.randn(2, 4, 8, 8) * 10)
    assert flow.abs().max() <= 0.2 + 1e-6 and mask.min() >= 0 and mask.max() <= 1


def test_frozen_decoder_gets_no_grad():
    torch.manual_seed(0)
    gen = small_generator(16, 16)
    enc = lambda x: (torch.zeros(len(x), 16), [torch.randn(len(x), 8, 8, 8), torch.randn(len(x), 4, 16, 16)])
    dec = InvertibilityDecomposition(enc, gen, stages=(2, 3), enc_channels=(8, 4), warp_scale=0.3)
    out = dec(torch.rand(2, 1, 16, 16))
    out.output.pow(2).mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in gen.parameters())
    assert any(p.grad is not None for p in dec.heads.parameters())
    with pytest.raises(ValueError, match="stages"):
        InvertibilityDecomposition(enc, gen, stages=(3, 2), enc_channels=(8, 4))


def test_fuse_masks_closed_form():
    prev = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    new = torch.full((1, 1, 2, 2), 0.6)
    expected = (new * prev + prev * (1 - prev)).clamp(0, 1)
    assert torch.allclose(fuse_masks(prev, new), expected)


def test_ood_error_split_and_iou_known_answers():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    split = ood_error_split(x, y, m)
    assert abs(split["ood_mse"] - 1.0) < 1e-6 and abs(split["id_mse"] - 0.25 / 3) < 1e-6
    assert abs(float(mask_iou(y, m, threshold=0.4)) - 0.5) < 1e-6


def test_area_hinge_drives_mask_down():
    torch.manual_seed(0)
    head = FlowMaskHead(4, enc_channels=3, warp_scale=0.3, hidden=8)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    fe, fg = torch.randn(4, 3, 8, 8), torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        start = float(head(fe, fg)[2].mean())
    for _ in range(30):
        opt.zero_grad()
        (50 * mask_regularizer(head(fe, fg)[2], area_target=0.0)).backward()
        opt.step()
    with torch.no_grad():
        end = float(head(fe, fg)[2].mean())
    assert start > 0.2 and end < 0.05


def test_clear_errors():
    with pytest.raises(ValueError, match="area_target"):
        mask_regularizer(torch.rand(1, 1, 4, 4), area_target=1.5)
    with pytest.raises(ValueError, match="blur"):
        error_threshold_mask(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), tau=0.1, blur=2)
    with pytest.raises(ValueError, match="x_in and x_rec"):
        blend(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 5, 5), torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="f_gen must have 4 channels"):
        FlowMaskHead(4, enc_channels=3)(torch.rand(1, 3, 4, 4), torch.rand(1, 5, 4, 4))
