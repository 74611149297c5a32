"""Tests of the 2-D differentiable tactile simulator (paper slug: difftactile)."""
import pytest
import torch

from gradkit.physics import Circle, DiffSim2D, PenaltyContact, SoftBody2D, energy_drift, evaluate_sdf, \
    penalty_contact_force, rectangle_mesh


def _body(**kw):
    return SoftBody2D(rectangle_mesh(6, 3, dtype=torch.float64), **kw).double()


def test_zero_force_at_rest_and_force_is_minus_energy_gradient():
    body = _body()
    assert body.internal_forces(body.rest).abs().max() < 1e-8
    g = torch.Generator().manual_seed(0)
    x = (body.rest + 0.01 * torch.randn(body.rest.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -torch.autograd.grad(body.elastic_energy(x), x)[0]
    torch.testing.assert_close(body.internal_forces(x), ref, rtol=1e-8, atol=1e-8)


def test_contact_law():
    n, v0 = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)
    assert penalty_contact_force(torch.tensor([0.01]), n, v0, 1000.0, 5.0, 20.0, 0.5).abs().max() == 0
    f1 = penalty_contact_force(torch.tensor([-0.01]), n, v0, 1000.0, 5.0, 20.0, 0.5)
    f2 = penalty_contact_force(torch.tensor([-0.02]), n, v0, 1000.0, 5.0, 20.0, 0.5)
    torch.testing.assert_close(f2, 2 * f1)
    v = torch.tensor([[3.0, 0.0]])           # body point sliding +x relative to the object
    f = penalty_contact_force(torch.tensor([-0.01]), n, v, 1000.0, 0.0, 20.0, 0.5)
    assert f[0, 0] < 0 and abs(float(f[0, 0])) <= 0.5 * float(f[0, 1]) * (1 + 1e-6)  # Coulomb cap


def test_energy_error_is_first_order_in_dt():
    """Free vibration from a 2% stretch (no contact, damping or gravity): symplectic Euler's energy error is
    O(dt) (6.7% at dt = 2e-4, a fifth of the stability bound, on this coarse pad); halving dt halves it, and
    at dt = 2.5e-5 it is below 1%."""
    body = _body()
    drifts = [energy_drift(body, dt, sub, control_steps=10) for dt, sub in ((2e-4, 20), (1e-4, 40), (5e-5, 80),
                                                                            (2.5e-5, 160))]
    for big, small in zip(drifts, drifts[1:]):
        assert 0.4 < small / big < 0.6
    assert drifts[-1] < 0.01


def test_finite_differences_log_kn():
    contact = PenaltyContact().double()
    sim = DiffSim2D(_body(damping=50.0), contact, Circle(0.5, center=(0.0, -0.52)), dt=2e-4, substeps=10,
                    grad_clip=None)
    traj = torch.tensor([[0.0, -0.02 * k] for k in range(1, 6)], dtype=torch.float64)

    def loss():
        return sim.rollout(traj)["contact_force"].pow(2).sum()

    g = torch.autograd.grad(loss(), contact.log_kn)[0]
    h = 1e-6
    with torch.no_grad():
        contact.log_kn += h
        lp = loss()
        contact.log_kn -= 2 * h
        lm = loss()
        contact.log_kn += h
    assert abs(float(g) - float((lp - lm) / (2 * h))) <= 1e-4 * abs(float(g)) + 1e-9


def test_bad_inputs():
    body = _body()
    with pytest.raises(ValueError, match="stability bound"):
        DiffSim2D(body, PenaltyContact(), Circle(), dt=1.0)
    with pytest.raises(ValueError, match="phi of shape"):
        evaluate_sdf(lambda p: p.sum(-1, keepdim=True), torch.zeros(4, 2))
