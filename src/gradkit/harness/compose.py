"""Composition matrix: which gradkit techniques stack in one model, with the gradients checked.

Every family is one technique that acts on the same small model. A family is either a *layer* (it
replaces a block of the model body: gradient reversal, binary estimators, TrAct, reversible coupling,
Mesa, EvoNorm, Peri-LN, KAN), a *loss* term (Hessian alignment), a *gradient transform* run between
``backward`` and ``step`` (gradient noise, the orthogonal-gradient combination, DGC), or the
*optimizer* (M-FAC). A pair check builds two copies of one float64 model that uses both families:

- **ours**: the gradkit components, used as a user would;
- **reference**: the same math from plain parts (detach tricks for straight-through and reversed
  gradients, an explicit ridge solve for TrAct's weight gradient, plain autograd for the coupling that
  the reversible block recomputes, a dense solve for M-FAC's first step, explicit top-k for DGC, a
  double-backward Hessian-gradient product for the alignment penalty).

Both take one training step on the same batch. The check compares, in order: the loss; the gradients
after backward and after every transform; the parameters after the step; the buffers (running
statistics). Exact families must agree to 1e-9 relative. A lossy family (Mesa stores 8-bit activations)
must keep its invariant instead: gradients within its quantisation tolerance and fewer saved bytes. A
stochastic family (gradient noise) must add noise of the scheduled standard deviation, which the
reference then adds too. Where two families cannot work together the component raises a documented
error, and the cell says so.

``check_pair("tract", "reversible")`` returns a :class:`Cell`; ``run_matrix()`` checks every pair.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FAMILIES", "Cell", "Family", "check_pair", "run_matrix", "family_names"]

DTYPE = torch.float64
EXACT_RTOL = 1e-9
WIDTH = 8        # width of one body block (a reversible block couples two halves of this width)
BATCH = 12
IN_DIM = 5


@dataclass
class Family:
    """One technique in the matrix: its kind, a one-line description and its builders."""

    name: str
    kind: str  # "layer" | "loss" | "transform" | "optimizer"
    description: str
    components: str
    lossy: bool = False


@dataclass
class Cell:
    """The outcome of one pair: ``status`` is "ok", "invariant" (lossy/stochastic, invariant held),
    "error" (a documented, clear error) or "broken" (gradients differ, or an unexpected exception)."""

    a: str
    b: str
    status: str
    reason: str
    max_rel_err: float = float("nan")
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def green(self) -> bool:
        return self.status in ("ok", "invariant", "error")


# ---------------------------------------------------------------------------------------------------
# Reference modules: the same math from plain PyTorch parts. Each copies the parameters of the gradkit
# module it mirrors and registers them in the same order, so gradients can be compared position by position.

def _param(p: Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().clone())


class _RefGRL(nn.Module):
    """Linear then gradient reversal: forward identity, backward times -lambda (detach trick)."""

    def __init__(self, ours: nn.Sequential) -> None:
        super().__init__()
        lin, grl = ours[0], ours[1]
        self.weight, self.bias = _param(lin.weight), _param(lin.bias)
        self.lam = float(grl.lambda_)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.weight, self.bias)
        return (1 + self.lam) * h.detach() - self.lam * h


def _ste(x: Tensor) -> Tensor:
    """sign(x) forward; clipped identity (1 on |x| <= 1) backward."""
    xc = x.clamp(-1.0, 1.0)
    return xc + (torch.sign(x) - xc).detach()


class _RefBinary(nn.Module):
    """y = ste(x) @ (ste(W) * mean|W|)^T + b."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = _param(ours.weight), _param(ours.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_ste(x), _ste(self.weight) * self.weight.abs().mean(), self.bias)


class _RefTrAct(nn.Module):
    """Forward and input gradient of a Linear; weight gradient G^T X (X^T X / b + lambda I)^-1.

    y = X W_d^T + b + Xs (W - W_d)^T with W_d = W.detach() and Xs = X M^-1 (detached): the second
    term is zero in value, its weight gradient is G^T Xs.
    """

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = _param(ours.weight), _param(ours.bias)
        self.lam = float(ours.lambda_)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).detach()
        m = x2.T @ x2 / x2.shape[0] + self.lam * torch.eye(x2.shape[1], dtype=x.dtype)
        xs = torch.linalg.solve(m, x2.T).T.reshape(x.shape)
        w_d = self.weight.detach()
        return F.linear(x, w_d, self.bias) + F.linear(xs, self.weight - w_d)


class _RefPeriLN(nn.Module):
    """h + LN_out(Linear(LN_in(h)))."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = _param(ours.sublayer.weight), _param(ours.sublayer.bias)
        self.in_w, self.in_b = _param(ours.norm_in.weight), _param(ours.norm_in.bias)
        self.out_w, self.out_b = _param(ours.norm_out.weight), _param(ours.norm_out.bias)
        self.eps = float(ours.eps)

    def forward(self, h: Tensor) -> Tensor:
        n = (h.shape[-1],)
        z = F.linear(F.layer_norm(h, n, self.in_w, self.in_b, self.eps), self.weight, self.bias)
        return h + F.layer_norm(z, n, self.out_w, self.out_b, self.eps)


class _AsImage(nn.Module):
    """Run a (N, C, H, W) layer on flat features: (N, C*H*W) <-> (N, C, H, W)."""

    def __init__(self, layer: nn.Module, channels: int) -> None:
        super().__init__()
        self.layer, self.channels = layer, channels

    def forward(self, x: Tensor) -> Tensor:
        n, d = x.shape
        side = int(math.isqrt(d // self.channels))
        return self.layer(x.reshape(n, self.channels, side, side)).reshape(n, d)


class _Coupled(nn.Module):
    """Additive coupling with plain autograd: y1 = x1 + F(x2), y2 = x2 + G(y1)."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], dim=-1)


# ---------------------------------------------------------------------------------------------------
# Layer families: (ours, reference) block builders on width w.

def _lin(w: int) -> nn.Module:
    return nn.Linear(w, w)


def _layer_grl(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import GradientReversal
    ours = nn.Sequential(_lin(w), GradientReversal(0.5))
    return ours, _RefGRL(ours)


def _layer_binary(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import BinaryLinear
    ours = BinaryLinear(w, w, estimator="ste", binarize_act=True, scale="mean_abs")
    return ours, _RefBinary(ours)


def _layer_tract(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import TrActLinear
    ours = TrActLinear(w, w, lambda_=0.1)
    return ours, _RefTrAct(ours)


def _layer_mesa(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import MesaLinear
    ours = MesaLinear(w, w, bits=8)
    # stochastic rounding from a private stream: random draws after the layer (dropout) match plain float
    ours.quantizer.generator = torch.Generator().manual_seed(0)
    ref = nn.Linear(w, w)
    ref.load_state_dict({"weight": ours.weight.detach().clone(), "bias": ours.bias.detach().clone()})
    return ours, ref


def _layer_evonorm(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import EvoNormB0
    ours = _AsImage(EvoNormB0(w // 4), w // 4)  # w = (w/4 channels) x 2 x 2
    return ours, copy.deepcopy(ours)


def _layer_peri_ln(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import ResidualNormBlock
    ours = ResidualNormBlock(_lin(w), w, placement="peri", norm="layernorm")
    with torch.no_grad():  # non-trivial affine norms
        for ln in (ours.norm_in, ours.norm_out):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.3, 0.3)
    return ours, _RefPeriLN(ours)


def _layer_kan(w: int) -> tuple[nn.Module, nn.Module]:
    from gradkit.nn import KANLayer
    ours = KANLayer(w, w, "chebyshev")
    return ours, copy.deepcopy(ours)


def _layer_dropout(w: int) -> tuple[nn.Module, nn.Module]:
    ours = nn.Sequential(_lin(w), nn.Dropout(0.3))
    return ours, copy.deepcopy(ours)  # both sides draw their masks from the same reseeded RNG


def _plain_block(w: int) -> tuple[nn.Module, nn.Module]:
    ours = nn.Sequential(_lin(w), nn.Tanh())
    return ours, copy.deepcopy(ours)


LAYERS: dict[str, Callable[[int], tuple[nn.Module, nn.Module]]] = {
    "grl": _layer_grl, "binary": _layer_binary, "tract": _layer_tract, "mesa": _layer_mesa,
    "evonorm": _layer_evonorm, "peri_ln": _layer_peri_ln, "kan": _layer_kan, "dropout": _layer_dropout,
}

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("grl", "layer", "gradient reversal after a Linear", "nn.GradientReversal (dann)"),
    Family("binary", "layer", "binary weights and activations, straight-through estimator",
           "nn.BinaryLinear (reste, biper)"),
    Family("tract", "layer", "TrAct weight gradient (ridge-whitened by the layer input)", "nn.TrActLinear (tract)"),
    Family("reversible", "layer", "additive reversible coupling that recomputes its input in backward",
           "nn.ReversibleBlock, nn.ReversibleSequential (revcol, rev-mbconv)"),
    Family("mesa", "layer", "8-bit saved activations (lossy by design)", "nn.MesaLinear (mesa)", lossy=True),
    Family("evonorm", "layer", "EvoNorm-B0 (batch variance, running statistics)", "nn.EvoNormB0 (evonorm)"),
    Family("peri_ln", "layer", "Peri-LN residual block", "nn.ResidualNormBlock (peri-ln)"),
    Family("kan", "layer", "KAN layer (Chebyshev basis)", "nn.KANLayer (s-kan)"),
    Family("dropout", "layer", "dropout: a layer that draws random numbers in forward (a reversible block "
           "must replay them when it recomputes)", "torch.nn.Dropout with nn.ReversibleBlock(preserve_rng=True)"),
    Family("hessian_alignment", "loss", "Hessian-gradient-product alignment penalty on the head",
           "nn.HessianAlignment (hessian-alignment)"),
    Family("gradient_noise", "transform", "annealed Gaussian gradient noise (stochastic by design)",
           "optim.GradientNoise (gradient-noise)", lossy=True),
    Family("orthogonal", "transform", "main gradient plus the orthogonal part of an auxiliary gradient",
           "optim.OrthogonalGradient (odice)"),
    Family("dgc", "transform", "deep gradient compression: top-k with residual accumulation",
           "distributed.DGCCompressor (dgc)"),
    Family("mfac", "optimizer", "M-FAC: inverse empirical-Fisher step", "optim.MFAC (mfac)"),
]}


def family_names() -> list[str]:
    return list(FAMILIES)


# ---------------------------------------------------------------------------------------------------
# Building the pair's model (ours and reference share every initial parameter value).

class _Model(nn.Module):
    def __init__(self, stem: nn.Module, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stem, self.body, self.head = stem, body, head

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _build(layers: list[str], reversible: bool) -> tuple[_Model, _Model]:
    """Stem -> body -> head. Without ``reversible`` the body chains the layer families on width WIDTH;
    with it, one reversible block (F and G: the layer families, on WIDTH // 2) or a two-block
    ReversibleSequential when no other layer family takes part."""
    from gradkit.nn import ReversibleBlock, ReversibleSequential
    width = WIDTH
    stem = nn.Linear(IN_DIM, width)
    head = nn.Linear(width, 1)
    if not reversible:
        pairs = [LAYERS[n](width) for n in layers] or [_plain_block(width)]
        body_o = nn.Sequential(*[o for o, _ in pairs])
        body_r = nn.Sequential(*[r for _, r in pairs])
    else:
        half = width // 2
        if layers:
            fo, fr = LAYERS[layers[0]](half)
            go, gr = LAYERS[layers[0]](half)
            body_o = ReversibleSequential(ReversibleBlock(fo, go, split_dim=-1))
            body_r = nn.Sequential(_Coupled(fr, gr))
        else:
            blocks = [(_plain_block(half), _plain_block(half)) for _ in range(2)]
            body_o = ReversibleSequential(*[ReversibleBlock(f[0], g[0], split_dim=-1) for f, g in blocks])
            body_r = nn.Sequential(*[_Coupled(f[1], g[1]) for f, g in blocks])
    ours = _Model(stem, body_o, head).to(DTYPE)
    ref = _Model(copy.deepcopy(stem), body_r, copy.deepcopy(head)).to(DTYPE)
    _check_alignment(ours, ref)
    return ours, ref


def _check_alignment(ours: nn.Module, ref: nn.Module) -> None:
    po, pr = list(ours.parameters()), list(ref.parameters())
    if len(po) != len(pr) or any(a.shape != b.shape for a, b in zip(po, pr)):
        raise AssertionError("reference model does not mirror the parameters of the gradkit model")
    for a, b in zip(po, pr):
        if not torch.equal(a, b):
            raise AssertionError("reference model does not start from the gradkit model's parameters")


# ---------------------------------------------------------------------------------------------------
# The step: loss (+ penalty), backward, transforms, optimizer step.

LR = 0.1
NOISE_ETA = 0.01
DGC_DENSITY = 0.25
MFAC_DAMP = 0.1
MFAC_NGRADS = 4
HA_BETA = 0.5
HA_ALPHA = 0.2
ORTHO_ETA = 0.7


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, IN_DIM, generator=g, dtype=DTYPE)
    y = torch.randn(BATCH, 1, generator=g, dtype=DTYPE)
    return x, y


def _domain_losses(model: _Model, x: Tensor, y: Tensor) -> list[Tensor]:
    half = BATCH // 2
    return [F.mse_loss(model(x[:half]), y[:half]), F.mse_loss(model(x[half:]), y[half:])]


def _ref_alignment_penalty(model: _Model, losses: list[Tensor]) -> Tensor:
    """mean_e [alpha ||H_e g_e - H g||^2 + beta ||g_e - g||^2] over the head, pooled terms detached."""
    head = list(model.head.parameters())

    def g_and_hg(loss: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.autograd.grad(loss, head, create_graph=True)
        gflat = torch.cat([t.reshape(-1) for t in g])
        hg = torch.autograd.grad(gflat, head, grad_outputs=gflat, create_graph=True)
        # H g = grad of (1/2)||g||^2; g keeps its graph, so the penalty differentiates through it too
        return gflat, torch.cat([t.reshape(-1) for t in hg])

    pooled = torch.stack(losses).mean()
    g, h = g_and_hg(pooled)
    g, h = g.detach(), h.detach()
    terms = []
    for le in losses:
        ge, he = g_and_hg(le)
        terms.append(HA_ALPHA * (he - h).pow(2).sum() + HA_BETA * (ge - g).pow(2).sum())
    return torch.stack(terms).mean()


def _grads(model: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    num = math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.pow(2).sum()) for y in b))
    return num / max(den, 1e-300)


class _Mismatch(Exception):
    pass


def _compare(stage: str, a: list[Tensor], b: list[Tensor], rtol: float, errs: dict) -> None:
    err = _rel_err(a, b)
    errs[stage] = err
    if not err <= rtol:
        raise _Mismatch(f"{stage} differ from the plain-parts reference: relative error {err:.2e} > {rtol:.0e}")


def _dgc_reference(grads: list[Tensor], sent: list[Tensor], density: float) -> list[Tensor]:
    """Check that the DGC output keeps exactly the largest-magnitude entries of each >= 2-D gradient."""
    out = []
    for g, s in zip(grads, sent):
        if g.dim() < 2:
            out.append(g.clone())
            continue
        k = int((s != 0).sum())
        want = max(1, math.ceil(density * g.numel()))
        if abs(k - want) > 1:
            raise _Mismatch(f"DGC sent {k} of {g.numel()} entries, expected about {want} at density {density}")
        idx = g.reshape(-1).abs().topk(k).indices
        r = torch.zeros_like(g).reshape(-1)
        r[idx] = g.reshape(-1)[idx]
        out.append(r.reshape(g.shape))
    return out


def _mfac_reference(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """First M-FAC step, dense: w - lr (damp I + g g^T / m)^-1 g."""
    g = torch.cat([t.reshape(-1) for t in grads])
    fisher = MFAC_DAMP * torch.eye(g.numel(), dtype=g.dtype) + torch.outer(g, g) / MFAC_NGRADS
    u = torch.linalg.solve(fisher, g)
    out, i = [], 0
    for p in params:
        n = p.numel()
        out.append(p.detach() - LR * u[i:i + n].reshape(p.shape))
        i += n
    return out


def _step(names: list[str], seed: int) -> dict:
    """One training step of ours and the reference; raises _Mismatch on a difference."""
    from gradkit.distributed import DGCCompressor
    from gradkit.nn import HessianAlignment, set_mesa_enabled
    from gradkit.optim import MFAC, GradientNoise, OrthogonalGradient
    from gradkit.testing import SavedBytesMeter

    fams = [FAMILIES[n] for n in names]
    layers = [f.name for f in fams if f.kind == "layer" and f.name != "reversible"]
    reversible = "reversible" in names
    lossy = any(f.lossy for f in fams if f.kind == "layer")
    torch.manual_seed(seed)
    ours, ref = _build(layers, reversible)
    x, y = _data(seed + 1)
    errs: dict[str, float] = {}
    rtol = 0.05 if lossy else EXACT_RTOL
    info: dict[str, Any] = {}

    # ---- forward and backward -------------------------------------------------------------------
    align = "hessian_alignment" in names
    ortho = "orthogonal" in names
    reg = HessianAlignment(ours.head.parameters(), alpha=HA_ALPHA, beta=HA_BETA, method="hgp") if align else None

    def forward(model: _Model, penalty: Callable[[_Model, list[Tensor]], Tensor]) -> tuple[Tensor, Tensor]:
        """(main loss, auxiliary loss): MSE, or the mean domain loss plus the alignment penalty."""
        torch.manual_seed(seed + 2)  # stochastic layers draw the same numbers on both sides
        if align:
            losses = _domain_losses(model, x, y)
            main = torch.stack(losses).mean() + penalty(model, losses)
        else:
            main = F.mse_loss(model(x), y)
        aux = model.features(x).pow(2).mean() if ortho else main.new_zeros(())
        return main, aux

    meter_o, meter_r = SavedBytesMeter(), SavedBytesMeter()
    with meter_o:
        main_o, aux_o = forward(ours, lambda m, ls: reg(ls)[0])
    with meter_r:
        main_r, aux_r = forward(ref, _ref_alignment_penalty)
    params_o, params_r = list(ours.parameters()), list(ref.parameters())
    if ortho:
        OrthogonalGradient(params_o, eta=ORTHO_ETA).backward(main_o, aux_o)
        gm = torch.autograd.grad(main_r, params_r, retain_graph=True, allow_unused=True)
        ga = torch.autograd.grad(aux_r, params_r, allow_unused=True)
        gm = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(params_r, gm)])
        ga = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(params_r, ga)])
        comb = gm + ORTHO_ETA * (ga - torch.dot(gm, ga) / torch.dot(gm, gm) * gm)
        i = 0
        for p in params_r:
            p.grad = comb[i:i + p.numel()].reshape(p.shape).clone()
            i += p.numel()
    else:
        main_o.backward()
        main_r.backward()
    loss_o, loss_r = main_o.detach(), main_r.detach()
    _compare("losses", [loss_o], [loss_r], EXACT_RTOL, errs)
    go, gr = _grads(ours), _grads(ref)
    bad = [i for i, g in enumerate(go) if not bool(torch.isfinite(g).all())]
    if bad:
        raise _Mismatch(f"gradients of parameters {bad} are not finite")
    _compare("gradients", go, gr, rtol, errs)
    if lossy:
        info["saved_bytes"] = (meter_o.bytes, meter_r.bytes)
        if "mesa" in names and not reversible and not meter_o.bytes < meter_r.bytes:
            raise _Mismatch(f"Mesa saved {meter_o.bytes} bytes, not fewer than plain float64's {meter_r.bytes}")
        # from here on both sides continue from the same gradients: the step checks what follows exactly
        for p, g in zip(ref.parameters(), go):
            p.grad = g.clone()
        gr = go

    # ---- gradient transforms ------------------------------------------------------------------
    for name in [n for n in names if FAMILIES[n].kind == "transform" and n != "orthogonal"]:
        if name == "gradient_noise":
            gn = GradientNoise(eta=NOISE_ETA, gamma=0.55, generator=torch.Generator().manual_seed(seed))
            before = _grads(ours)
            gn(params_o)
            noise = [a - b for a, b in zip(_grads(ours), before)]
            flat = torch.cat([t.reshape(-1) for t in noise])
            sd, want = float(flat.std()), math.sqrt(NOISE_ETA)
            n = flat.numel()
            if not (abs(sd / want - 1) < 6 / math.sqrt(2 * n) and abs(float(flat.mean())) < 6 * want / math.sqrt(n)):
                raise _Mismatch(f"gradient noise has std {sd:.4f} and mean {float(flat.mean()):.4f} over {n} "
                                f"entries, expected N(0, {want:.4f}^2)")
            for p, z in zip(params_r, noise):
                p.grad = p.grad + z
            info["noise_std"] = sd
        elif name == "dgc":
            comp = DGCCompressor(density=DGC_DENSITY, momentum=0.9, warmup=None)
            grads_in = [p.grad.detach().clone() for p in params_o]
            for i, p in enumerate(params_o):
                if comp.compressible(p.grad):  # fewer than min_dim dims: sent densely
                    sg = comp.compress(str(i), p.grad)
                    p.grad = comp.decompress([sg], tuple(p.shape)).to(p.grad)
            want = _dgc_reference(grads_in, [p.grad for p in params_o], DGC_DENSITY)
            for p, g in zip(params_r, want):
                p.grad = g
        _compare(f"gradients after {name}", _grads(ours), _grads(ref), EXACT_RTOL, errs)

    # ---- optimizer step ---------------------------------------------------------------------------
    if "mfac" in names:
        MFAC(params_o, lr=LR, ngrads=MFAC_NGRADS, damp=MFAC_DAMP).step()
        want = _mfac_reference(params_r, [p.grad for p in params_r])
        with torch.no_grad():
            for p, w in zip(params_r, want):
                p.copy_(w)
    else:
        torch.optim.SGD(params_o, lr=LR).step()
        torch.optim.SGD(params_r, lr=LR).step()
    _compare("parameters after the step", [p.detach() for p in params_o], [p.detach() for p in params_r],
             EXACT_RTOL, errs)
    bo = [b for b in ours.buffers() if b.is_floating_point()]
    br = [b for b in ref.buffers() if b.is_floating_point()]
    if br and len(bo) == len(br):
        _compare("running statistics", bo, br, EXACT_RTOL, errs)
    if "mesa" in names:
        set_mesa_enabled(ours, True)
    return {"errors": errs, **info}


# Pairs that cannot work, with the documented error the components raise.
KNOWN_ERRORS: dict[frozenset, str] = {}


def check_pair(a: str, b: str, *, seed: int = 0) -> Cell:
    """Check one pair of families (``a == b``: the family alone)."""
    for n in (a, b):
        if n not in FAMILIES:
            raise ValueError(f"unknown family {n!r}; known: {', '.join(FAMILIES)}")
    names = [a] if a == b else [a, b]
    t0 = time.perf_counter()
    try:
        out = _step(names, seed)
    except _Mismatch as e:
        return Cell(a, b, "broken", str(e), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an exception is a finding of the matrix
        key = frozenset(names)
        if key in KNOWN_ERRORS and KNOWN_ERRORS[key] in str(e):
            return Cell(a, b, "error", f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        return Cell(a, b, "broken", f"unexpected {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    errs = out["errors"]
    worst = max(errs.values()) if errs else 0.0
    lossy = [n for n in names if FAMILIES[n].lossy]
    if lossy:
        why = []
        if "mesa" in lossy:
            so, sr = out.get("saved_bytes", (0, 0))
            why.append(f"Mesa gradients within {errs.get('gradients', float('nan')):.1e} of exact; saved "
                       f"{so} B vs {sr} B")
        if "gradient_noise" in lossy:
            why.append(f"noise std {out['noise_std']:.4f} (scheduled {math.sqrt(NOISE_ETA):.4f})")
        reason = "; ".join(why) + f"; every exact stage within {EXACT_RTOL:.0e}"
        status = "invariant"
    else:
        reason = f"equal to the plain-parts reference at every stage (max rel. error {worst:.1e})"
        status = "ok"
    return Cell(a, b, status, reason, worst, time.perf_counter() - t0, {"errors": errs})


def run_matrix(families: list[str] | None = None, *, seed: int = 0,
               progress: Callable[[Cell], None] | None = None) -> list[Cell]:
    """Every unordered pair of ``families`` (default all), the diagonal included."""
    names = list(FAMILIES) if families is None else list(families)
    cells = []
    for i, j in itertools.combinations_with_replacement(range(len(names)), 2):
        cell = check_pair(names[i], names[j], seed=seed)
        cells.append(cell)
        if progress is not None:
            progress(cell)
    return cells
