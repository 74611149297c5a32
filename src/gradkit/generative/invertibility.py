"""Invertibility decomposition over a frozen decoder: align the decoder's features to the input, mask what it cannot make.

Paper slug: ``gan-inversion-ood`` (Out-of-domain GAN inversion via Invertibility Decomposition). An encoder
inverts an image x into a frozen generator G. A small head per feature level predicts a flow bounded by
tanh, flow = s * tanh(.), and a mask alpha = sigmoid(.). It aligns the generator feature to the input
geometry, F~ = alpha * warp(F, flow) + (1 - alpha) * F, which lowers the in-domain (ID) error. The fused mask M
then marks the out-of-domain (OOD) pixels, and the output copies the input there:

    y = M * x + (1 - M) * G_aligned(x)

Masks are fused across cycles and levels as a <- new * up(a) + up(a) * (1 - up(a)), then clipped to
[0, 1]. Training uses the pixel loss on y plus :func:`mask_regularizer`, which is
binary_weight * mean(min(M, 1 - M)) + max(0, mean(M) - area_target). The area hinge stops the trivial
M = 1. The baseline mask thresholds the reconstruction error (:func:`error_threshold_mask`), and
:func:`ood_error_split` splits an error into its ID and OOD parts.

>>> x = torch.rand(2, 1, 8, 8)
>>> warp(x, torch.zeros(2, 2, 8, 8)).allclose(x)          # a zero flow is the identity
True
>>> blend(x, torch.zeros_like(x), torch.ones(2, 1, 8, 8)).equal(x)
True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, integer, is_int, real_in, real_scalar, tensor
from .layered import LayeredGenerator

__all__ = ["warp", "bounded_flow", "fuse_masks", "blend", "mask_regularizer", "error_threshold_mask", "mask_iou",
           "ood_error_split", "FlowMaskHead", "InvertibilityDecomposition", "Decomposition"]


# --------------------------------------------------------------------------------------------- functions
def _images(name: str, x: Tensor) -> Tensor:
    tensor(name, x, floating=True)
    if x.dim() != 4:
        raise ArgumentError(f"{name} must be a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    return x


def _check_flow(flow: Tensor, x: Tensor) -> None:
    tensor("flow", flow, floating=True)
    n, _, h, w = x.shape
    if tuple(flow.shape) != (n, 2, h, w):
        raise ArgumentError(f"flow must have shape (N, 2, H, W) = {(n, 2, h, w)} (x, y displacements in "
                            f"normalised [-1, 1] units) for x of shape {tuple(x.shape)}, got {tuple(flow.shape)}")


def warp(x: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Sample ``x`` at the identity grid plus ``flow``: out = grid_sample(x, id + flow), align_corners=True.

    Paper slug: gan-inversion-ood. ``flow`` is (N, 2, H, W): channel 0 the x (width) and channel 1 the
    y (height) displacement in normalised units, so one pixel is 2 / (W - 1). A zero flow is the identity,
    and a constant flow of 2/(W-1) in x makes out[..., j] = x[..., j + 1].

    >>> x = torch.rand(1, 3, 5, 5); f = torch.zeros(1, 2, 5, 5); f[:, 0] = 0.5   # 2/(5-1): one pixel
    >>> warp(x, f)[..., :4].allclose(x[..., 1:])
    True
    """
    _images("x", x)
    _check_flow(flow, x)
    choice("padding_mode", padding_mode, ("zeros", "border", "reflection"))
    n, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0) + flow.to(x.dtype).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def bounded_flow(raw: Tensor, warp_scale: float) -> Tensor:
    """flow = warp_scale * tanh(raw), so |flow| <= warp_scale everywhere (paper slug: gan-inversion-ood).

    >>> bounded_flow(torch.tensor([1e3, -1e3]), 0.3).abs().max() <= 0.3
    tensor(True)
    """
    tensor("raw", raw, floating=True)
    s = real_scalar("warp_scale", warp_scale, nonneg=True)
    return torch.tanh(raw) * s


def fuse_masks(prev: Tensor, new: Tensor) -> Tensor:
    """Fuse a new mask with an earlier (possibly coarser) one: clip(new * g + g * (1 - g), 0, 1), g = up(prev).

    Paper slug: gan-inversion-ood. ``g`` is ``prev`` bilinearly resized to ``new``'s size (align_corners=True).
    Where the earlier mask is 1 the new mask passes, and where it is 0 the result is 0.

    >>> fuse_masks(torch.ones(1, 1, 2, 2), torch.full((1, 1, 4, 4), 0.3)).unique()
    tensor([0.3000])
    """
    _images("prev", prev)
    _images("new", new)
    if prev.shape[:2] != new.shape[:2]:
        raise ArgumentError(f"prev and new must share (N, C), got {tuple(prev.shape)} and {tuple(new.shape)}")
    g = prev if prev.shape[-2:] == new.shape[-2:] else F.interpolate(prev, size=new.shape[-2:], mode="bilinear",
                                                                     align_corners=True)
    return (new * g + g * (1 - g)).clamp(0.0, 1.0)


def blend(x_in: Tensor, x_rec: Tensor, mask: Tensor) -> Tensor:
    """mask * x_in + (1 - mask) * x_rec: the input where the mask says OOD (mask = 1), the reconstruction elsewhere.

    Paper slug: gan-inversion-ood. ``mask`` broadcasts against the images, e.g. (N, 1, H, W) for (N, C, H, W).

    >>> blend(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([[[[1., 0.], [0., 1.]]]]))
    tensor([[[[1., 0.],
              [0., 1.]]]])
    """
    _images("x_in", x_in)
    _images("x_rec", x_rec)
    _images("mask", mask)
    if x_in.shape != x_rec.shape:
        raise ArgumentError(f"x_in and x_rec must have the same shape, got {tuple(x_in.shape)} and {tuple(x_rec.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, x_in.shape)
    except RuntimeError:
        raise ArgumentError(f"mask of shape {tuple(mask.shape)} does not broadcast to the images' shape "
                            f"{tuple(x_in.shape)}") from None
    return torch.lerp(x_rec, x_in, mask)


def mask_regularizer(mask: Tensor, area_target: float = 0.25, binary_weight: float = 0.04,
                     area_weight: float = 1.0) -> Tensor:
    """binary_weight * mean(min(M, 1 - M)) + area_weight * max(0, mean(M) - area_target), a scalar.

    Paper slug: gan-inversion-ood. The binary term pushes M towards {0, 1}. The area hinge is zero, and has
    zero gradient, while the mean mask is at most ``area_target``. Above it, each element gets a gradient
    of area_weight / numel. Without the hinge the pixel loss drives the mask to 1, which copies the input.

    >>> mask_regularizer(torch.full((2, 1, 4, 4), 0.5), area_target=0.25)   # 0.04 * 0.5 + 0.25
    tensor(0.2700)
    """
    _images("mask", mask)
    a = real_in("area_target", area_target, 0.0, 1.0)
    bw = real_scalar("binary_weight", binary_weight, nonneg=True)
    aw = real_scalar("area_weight", area_weight, nonneg=True)
    binary = torch.minimum(mask, 1 - mask).mean()
    area = F.relu(mask.mean() - a)
    return bw * binary + aw * area


def _box_blur(x: Tensor, size: int) -> Tensor:
    if size == 1:
        return x
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)


def error_threshold_mask(x: Tensor, x_rec: Tensor, tau: float, blur: int = 3, temp: float = 0.05) -> Tensor:
    """The baseline invertibility mask: sigmoid((box_blur(mean_c |x - x_rec|) - tau) / temp), shape (N, 1, H, W).

    Paper slug: gan-inversion-ood (the reconstruction-error mask that the learned decomposition replaces).
    ``blur`` is an odd box size (1: none). ``temp = 0`` gives the hard mask 1[err > tau].

    >>> x = torch.zeros(1, 1, 4, 4); r = x.clone(); r[..., 0, 0] = 1
    >>> error_threshold_mask(x, r, tau=0.5, blur=1, temp=0)[0, 0, 0, :2]
    tensor([1., 0.])
    """
    _images("x", x)
    _images("x_rec", x_rec)
    if x.shape != x_rec.shape:
        raise ArgumentError(f"x and x_rec must have the same shape, got {tuple(x.shape)} and {tuple(x_rec.shape)}")
    tau = real_scalar("tau", tau)
    blur = integer("blur", blur, low=1)
    if blur % 2 == 0:
        raise ArgumentError(f"blur must be an odd int >= 1 (a box size), got {blur}")
    temp = real_scalar("temp", temp, nonneg=True)
    err = _box_blur((x - x_rec).abs().mean(dim=1, keepdim=True), blur)
    if temp == 0:
        return (err > tau).to(x.dtype)
    return torch.sigmoid((err - tau) / temp)


def mask_iou(mask: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-image IoU of the binarised mask (mask > threshold) with a binary target, shape (N,).

    Paper slug: gan-inversion-ood. IoU = |P and T| / |P or T|; an image where both are empty scores 1.

    >>> mask_iou(torch.tensor([[[[0.9, 0.1]]]]), torch.tensor([[[[1., 1.]]]]))
    tensor([0.5000])
    """
    _images("mask", mask)
    _images("target", target)
    if mask.shape != target.shape:
        raise ArgumentError(f"mask and target must have the same shape, got {tuple(mask.shape)} and "
                            f"{tuple(target.shape)}")
    thr = real_scalar("threshold", threshold)
    p, t = mask > thr, target > 0.5
    inter = (p & t).flatten(1).sum(1).to(mask.dtype)
    union = (p | t).flatten(1).sum(1).to(mask.dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def ood_error_split(x: Tensor, y: Tensor, ood_mask: Tensor) -> dict[str, float]:
    """Split the squared error of ``y`` against ``x`` into its in-domain and out-of-domain parts.

    Paper slug: gan-inversion-ood. With m = ood_mask in {0, 1} (broadcast over channels), returns
    ``id_mse`` = sum((1 - m) e) / sum(1 - m) and ``ood_mse`` = sum(m e) / sum(m), where e = (x - y)^2, plus
    ``mse`` (all pixels) and ``ood_fraction``. A part without pixels is reported as 0.

    >>> x = torch.zeros(1, 1, 2, 2); y = torch.tensor([[[[1., 0.], [0., 0.]]]]); m = y.clone()
    >>> ood_error_split(x, y, m)["id_mse"], ood_error_split(x, y, m)["ood_mse"]
    (0.0, 1.0)
    """
    _images("x", x)
    _images("y", y)
    _images("ood_mask", ood_mask)
    if x.shape != y.shape:
        raise ArgumentError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    try:
        m = torch.broadcast_to(ood_mask, x.shape).to(x.dtype)
    except RuntimeError:
        raise ArgumentError(f"ood_mask of shape {tuple(ood_mask.shape)} does not broadcast to {tuple(x.shape)}") from None
    e = (x - y).pow(2)
    n_ood, n_id = float(m.sum()), float((1 - m).sum())
    return {"mse": float(e.mean()),
            "id_mse": float(((1 - m) * e).sum()) / n_id if n_id > 0 else 0.0,
            "ood_mse": float((m * e).sum()) / n_ood if n_ood > 0 else 0.0,
            "ood_fraction": n_ood / m.numel()}


# --------------------------------------------------------------------------------------------- modules
class _Blur(nn.Module):
    """The fixed [1, 2, 1] x [1, 2, 1] / 16 blur, per channel, with replicate padding."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16.0)[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)


class FlowMaskHead(nn.Module):
    """Predicts a bounded flow and a mask from an encoder and a generator feature, and aligns the generator's.

    Paper slug: gan-inversion-ood. Each cycle computes

        (d, a) = blur(body([IN(F~) - IN(P(F_e)), IN(P(F_e))]))
        flow = clip(flow + s * tanh(d), -s, s)
        alpha = sigmoid(a), fused with the previous alpha by fuse_masks
        F~ = alpha * warp(F_g, flow) + (1 - alpha) * F_g

    P is a 1x1 conv from the encoder's channels to the generator's. The body is two conv blocks with
    InstanceNorm (Xavier-normal init). ``prev_mask`` is a coarser level's mask, fused with this level's mask
    in the last cycle (before that cycle's warp). With ``flow=False`` the flow stays 0 and only the mask is learned. With ``split_mask=True`` a
    second map gates the warp, so the returned mask serves only the blend.

    >>> head = FlowMaskHead(16, enc_channels=8, warp_scale=0.3)
    >>> aligned, flow, mask = head(torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8))
    >>> bool(flow.abs().max() <= 0.3), tuple(mask.shape)
    (True, (2, 1, 8, 8))
    """

    def __init__(self, gen_channels: int, enc_channels: int | None = None, warp_scale: float = 0.08,
                 hidden: int = 32, cycles: int = 2, flow: bool = True, split_mask: bool = False,
                 blur: bool = True) -> None:
        super().__init__()
        self.gen_channels = integer("gen_channels", gen_channels, low=1)
        self.enc_channels = self.gen_channels if enc_channels is None else integer("enc_channels", enc_channels, low=1)
        self.warp_scale = real_scalar("warp_scale", warp_scale, nonneg=True)
        self.hidden = integer("hidden", hidden, low=1)
        self.cycles = integer("cycles", cycles, low=1)
        self.use_flow = boolean("flow", flow)
        self.split_mask = boolean("split_mask", split_mask)
        c, h = self.gen_channels, self.hidden
        self.proj = nn.Conv2d(self.enc_channels, c, 1)
        self.norm = nn.InstanceNorm2d(c)
        self.body = nn.Sequential(
            nn.Conv2d(2 * c, h, 3, padding=1), nn.InstanceNorm2d(h, affine=True), nn.PReLU(h),
            nn.Conv2d(h, h, 3, padding=1), nn.InstanceNorm2d(h, affine=True), nn.PReLU(h),
            nn.Conv2d(h, 4 if self.split_mask else 3, 3, padding=1))
        self.blur = _Blur() if boolean("blur", blur) else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, f_enc: Tensor, f_gen: Tensor, prev_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(aligned generator feature, flow (N, 2, H, W) with |flow| <= warp_scale, mask (N, 1, H, W) in [0, 1])."""
        _images("f_gen", f_gen)
        _images("f_enc", f_enc)
        if f_gen.shape[1] != self.gen_channels:
            raise ArgumentError(f"f_gen must have {self.gen_channels} channels, got shape {tuple(f_gen.shape)}")
        if f_enc.shape[1] != self.enc_channels or f_enc.shape[0] != f_gen.shape[0] \
                or f_enc.shape[-2:] != f_gen.shape[-2:]:
            raise ArgumentError(f"f_enc must have shape (N, {self.enc_channels}, H, W) matching f_gen "
                                f"{tuple(f_gen.shape)}, got {tuple(f_enc.shape)}")
        if prev_mask is not None:
            _images("prev_mask", prev_mask)
            if prev_mask.shape[:2] != (f_gen.shape[0], 1):
                raise ArgumentError(f"prev_mask must have shape (N, 1, h, w) with N = {f_gen.shape[0]}, got "
                                    f"{tuple(prev_mask.shape)}")
        e = self.norm(self.proj(f_enc))
        aligned = f_gen
        flow = f_gen.new_zeros(f_gen.shape[0], 2, *f_gen.shape[-2:])
        mask = gate = None
        for cycle in range(self.cycles):
            out = self.blur(self.body(torch.cat([self.norm(aligned) - e, e], dim=1)))
            if self.use_flow:
                flow = (flow + bounded_flow(out[:, :2], self.warp_scale)).clamp(-self.warp_scale, self.warp_scale)
            new = torch.sigmoid(out[:, 2:3])
            mask = new if mask is None else fuse_masks(mask, new)
            if prev_mask is not None and cycle == self.cycles - 1:  # the coarser level's mask joins last
                mask = fuse_masks(prev_mask, mask)
            if self.split_mask:
                g_new = torch.sigmoid(out[:, 3:4])
                gate = g_new if gate is None else fuse_masks(gate, g_new)
            else:
                gate = mask
            aligned = torch.lerp(f_gen, warp(f_gen, flow, padding_mode="border"), gate) if self.use_flow else f_gen
        return aligned, flow, mask

    def extra_repr(self) -> str:
        return (f"gen_channels={self.gen_channels}, enc_channels={self.enc_channels}, warp_scale={self.warp_scale}, "
                f"cycles={self.cycles}, flow={self.use_flow}, split_mask={self.split_mask}")


@dataclass
class Decomposition:
    """What :class:`InvertibilityDecomposition` returns for a batch.

    output: the blend M * x + (1 - M) * reconstruction; reconstruction: the aligned generator output;
    mask: M at the image size, (N, 1, H, W), 1 = OOD; flows, masks: per level, coarse to fine.
    """

    output: Tensor
    reconstruction: Tensor
    mask: Tensor
    flows: list[Tensor]
    masks: list[Tensor]


class InvertibilityDecomposition(nn.Module):
    """A frozen encoder and generator with a trainable :class:`FlowMaskHead` at chosen generator stages.

    Paper slug: gan-inversion-ood. ``encoder(x)`` returns ``(z, feats)``, where feats[i] is the encoder
    feature at the resolution of the generator stage ``stages[i]``. The generator runs
    h_k = forward_between(prev, k, h). At each listed stage the head replaces h_k by its aligned version, and
    the generator continues from there. The per-level masks are fused (coarse to fine, then resized to the
    image), and the output is blend(x, G_aligned, M). Encoder and generator are frozen
    (requires_grad=False, kept in eval mode), so only the heads train.

    >>> gen = small_generator(16, 16)            # stages: z, 4x4, 8x8, 16x16, image
    >>> enc = lambda x: (torch.zeros(len(x), 16), [torch.randn(len(x), 8, 8, 8), torch.randn(len(x), 4, 16, 16)])
    >>> dec = InvertibilityDecomposition(enc, gen, stages=(2, 3), enc_channels=(8, 4), warp_scale=0.3)
    >>> tuple(dec(torch.rand(2, 1, 16, 16)).mask.shape)
    (2, 1, 16, 16)
    """

    def __init__(self, encoder: Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]], generator: LayeredGenerator,
                 stages: Sequence[int], enc_channels: Sequence[int], **head_kwargs) -> None:
        super().__init__()
        if not callable(encoder):
            raise ArgumentError(f"encoder must be callable (x -> (z, feats)), got {type(encoder).__name__}")
        if not isinstance(generator, LayeredGenerator):
            raise ArgumentError(f"generator must be a LayeredGenerator, got {type(generator).__name__}")
        stages = list(stages) if isinstance(stages, (list, tuple)) else stages
        if (not isinstance(stages, list) or not stages
                or not all(is_int(k, low=1, high=generator.num_blocks - 1) for k in stages)
                or any(b <= a for a, b in zip(stages, stages[1:]))):
            raise ArgumentError(f"stages must be increasing ints in [1, {generator.num_blocks - 1}] (feature stages "
                                f"of the generator), got {stages!r}")
        enc_channels = list(enc_channels) if isinstance(enc_channels, (list, tuple)) else enc_channels
        if (not isinstance(enc_channels, list) or len(enc_channels) != len(stages)
                or not all(is_int(c, low=1) for c in enc_channels)):
            raise ArgumentError(f"enc_channels must be {len(stages)} positive ints (one per stage), got {enc_channels!r}")
        shapes = generator.stage_shapes()
        for k in stages:
            if len(shapes[k]) != 3:
                raise ArgumentError(f"stage {k} of the generator is not a (C, H, W) feature map: {shapes[k]}")
        self.encoder = encoder
        self.generator = generator
        self.stages = tuple(stages)
        self.heads = nn.ModuleList(FlowMaskHead(shapes[k][0], c, **head_kwargs)
                                   for k, c in zip(self.stages, enc_channels))
        self._freeze()

    def _frozen(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.generator) if isinstance(m, nn.Module)]

    def _freeze(self) -> None:
        for m in self._frozen():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "InvertibilityDecomposition":
        super().train(mode)
        for m in self._frozen():
            m.eval()  # the frozen parts keep their running statistics
        return self

    def forward(self, x: Tensor) -> Decomposition:
        _images("x", x)
        z, feats = self.encoder(x)
        feats = list(feats)
        if len(feats) != len(self.stages):
            raise ArgumentError(f"encoder returned {len(feats)} feature maps, expected {len(self.stages)} "
                                f"(one per stage {self.stages})")
        h, at, mask = z, 0, None
        flows, masks = [], []
        for k, f_enc, head in zip(self.stages, feats, self.heads):
            h = self.generator.forward_between(at, k, h)
            h, flow, mask = head(f_enc, h, prev_mask=mask)
            flows.append(flow)
            masks.append(mask)
            at = k
        rec = self.generator.forward_from(at, h)
        if rec.shape[0] != x.shape[0] or rec.shape[1:] != x.shape[1:]:
            raise ArgumentError(f"the generator's output {tuple(rec.shape)} does not match x {tuple(x.shape)}")
        m = mask if mask.shape[-2:] == rec.shape[-2:] else \
            F.interpolate(mask, size=rec.shape[-2:], mode="bilinear", align_corners=True).clamp(0.0, 1.0)
        return Decomposition(blend(x, rec, m), rec, m, flows, masks)

    def extra_repr(self) -> str:
        return f"stages={self.stages}"
