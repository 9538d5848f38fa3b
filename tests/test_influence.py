"""CG, LiSSA, the reference's LiSSA, the residual and the group-influence update against the exact
Hessian of tiny float64 models (protocol §8.3, §11.3).

Tolerances: CG and full-data LiSSA (batch_size ≥ m) are deterministic and must match the exact solve to
1e-6 relative (CG to its tolerance). With the reference's stochastic batch-1 sampling LiSSA is a
Monte-Carlo estimate whose error shrinks only as 1/√repeats: 10 repeats of depth 2000 at scale 20 on the
21-parameter logistic regression below must land within 15 % of the exact update (observed 4–9 % over
generator seeds 0–3; 6–18 % at scale 5, where each step is noisier). The reference mode must equal a
literal re-implementation of the reference's code to rounding.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from spurious import influence
from spurious.errors import SpuriousError
from spurious.train import TrainingError


def toy_data(m=200, d=6, k=3, seed=0):
    """Return a noisy, non-separable k-class problem (so logistic regression has a finite optimum)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, k, generator=gen, dtype=torch.float64)
    y = (x @ w + 1.5 * torch.randn(m, k, generator=gen, dtype=torch.float64)).argmax(1)
    return x, y


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest on one thread, and are not slowed tenfold when the machine is busy.

    The test_deletion and test_mia modules import this autouse fixture too.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_full_batch(model, x, y, max_iter=500):
    """Minimise the mean cross-entropy with L-BFGS (to high precision by default); return the model."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    return model


def logistic(d=6, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, k).double()


def tiny_mlp(x, y, d=6, k=3, seed=0):
    """Return a 43-parameter tanh MLP after 20 L-BFGS steps: its Hessian is mildly indefinite, top ≈ 1."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, k)).double()
    return fit_full_batch(model, x, y, max_iter=20)


def exact_hessian(model, x, y):
    """Return the exact Hessian of the mean cross-entropy in all parameters (torch.autograd.functional)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(theta):
        chunks = theta.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return torch.autograd.functional.hessian(loss, parameters_to_vector(model.parameters()).detach())


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def eye_like(hess):
    return torch.eye(len(hess), dtype=hess.dtype)


def test_hvp_equals_exact_hessian_times_vector():
    x, y = toy_data()
    model = tiny_mlp(x, y)
    params = influence.trainable_params(model)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    hess = exact_hessian(model, x, y)
    assert rel_err(influence.hvp(model, influence.ce_loss(x, y), params, v), hess @ v) < 1e-10
    assert rel_err(influence.data_hvp(model, x, y, v, chunk=64), hess @ v) < 1e-10  # 4 uneven chunks


@pytest.mark.parametrize("kind,damping", [("logistic", 0.01), ("mlp", 0.1)])
def test_full_batch_lissa_and_cg_equal_the_damped_inverse(kind, damping):
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y) if kind == "logistic" else tiny_mlp(x, y)
    hess = exact_hessian(model, x, y)
    assert torch.linalg.eigvalsh(hess + damping * eye_like(hess)).min() > 0, "the damped Hessian must be positive"
    v = influence.summed_gradient(model, x[:1], y[:1])
    exact = torch.linalg.solve(hess + damping * eye_like(hess), v)
    got = influence.lissa_inverse_hvp(model, x, y, v, depth=1500, scale=2.0, damping=damping, repeats=1,
                                      batch_size=len(y))
    assert rel_err(got, exact) < 1e-6
    h, stats = influence.cg_inverse_hvp(model, x, y, v, damping, tol=1e-10, chunk=64)
    assert stats["cg_converged"] and stats["cg_residual"] <= 1e-10 and stats["cg_iterations"] <= len(hess)
    assert rel_err(h, exact) < 1e-6


def test_cg_stops_at_max_iter_and_says_it_did_not_converge():
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    v = influence.summed_gradient(model, x[:1], y[:1])
    h, stats = influence.cg_inverse_hvp(model, x, y, v, 0.01, tol=1e-10, max_iter=2)
    assert stats["cg_iterations"] == 2 and not stats["cg_converged"] and stats["cg_residual"] > 1e-3
    assert stats["cg_residual"] == pytest.approx(influence.relative_residual(model, x, y, h, v, 0.01), rel=1e-6)
    zero, stats = influence.cg_inverse_hvp(model, x, y, torch.zeros_like(v), 0.01)
    assert not zero.any() and stats["cg_iterations"] == 0


def test_cg_fails_on_negative_curvature_and_says_how_far_to_raise_the_damping():
    x, y = toy_data()
    model = tiny_mlp(x, y)
    values, vectors = torch.linalg.eigh(exact_hessian(model, x, y))
    assert values[0] < -1e-3  # the 20-step MLP's Hessian is indefinite
    with pytest.raises(TrainingError, match="negative curvature at iteration 1.*raise the damping above") as err:
        influence.cg_inverse_hvp(model, x, y, vectors[:, 0], damping=0.0)
    assert "\n" not in str(err.value) and f"{float(-values[0]):.3g}" in str(err.value)
    influence.cg_inverse_hvp(model, x, y, vectors[:, 0], damping=float(-values[0]) + 0.01)


def test_relative_residual_on_a_fixed_batch():
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    v = influence.summed_gradient(model, x[:2], y[:2])
    hess = exact_hessian(model, x, y)
    exact = torch.linalg.solve(hess + 0.1 * eye_like(hess), v)
    assert influence.relative_residual(model, x, y, exact, v, 0.1) < 1e-12
    assert influence.relative_residual(model, x, y, torch.zeros_like(v), v, 0.1) == pytest.approx(1.0)
    batch = influence.residual_indices(len(y), 50)
    sub = exact_hessian(model, x[batch], y[batch])
    expected = float(((sub + 0.1 * eye_like(sub)) @ exact - v).norm() / v.norm())
    assert influence.relative_residual(model, x[batch], y[batch], exact, v, 0.1) == pytest.approx(expected, rel=1e-9)
    torch.manual_seed(123)  # the batch does not depend on the global generator
    assert torch.equal(influence.residual_indices(len(y), 50), batch)
    assert sorted(influence.residual_indices(len(y), 10_000).tolist()) == list(range(len(y)))
    with pytest.raises(SpuriousError, match="residual batch"):
        influence.residual_indices(len(y), 0)


# ---------------------------------------------------------------- the reference's code, literally

def literal_reference_update(model, x_group, y_group, x, y, depth, scale, damp, r, generator, other):
    """Return the parameters the reference's group update produces, written the way its code is (protocol §8.3):
    per-parameter lists, v built with create_graph=True, repeats "added" with list +=, each piece divided by r,
    then zipped with the parameters. Repeats 2…r (which the reference computes and then drops) draw from
    `other`, so that the first runs see the same draws, in the same order, as influence.reference_lissa."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = None
    for i in range(len(y_group)):
        v = list(torch.autograd.grad(F.cross_entropy(model(x_group[i:i + 1]), y_group[i:i + 1]), params,
                                     create_graph=True))
        runs = []
        for rep in range(r):
            h = [t.detach() for t in v]
            for _ in range(depth):
                j = torch.randint(len(y), (1,), generator=generator if rep == 0 else other)
                first = torch.autograd.grad(F.cross_entropy(model(x[j]), y[j]), params, create_graph=True)
                dot = sum(torch.sum(a * b) for a, b in zip(first, h))
                hv = [t.detach() for t in torch.autograd.grad(dot, params, create_graph=True)]
                h = [a + (1 - damp) * b - c / scale for a, b, c in zip(v, h, hv)]
            runs.append(h)
        estimate = runs[0]
        for k in range(1, r):
            estimate += runs[k]  # the reference's "sum": list concatenation
        estimate = [t / r for t in estimate]
        total = estimate if total is None else [a + b for a, b in zip(total, estimate)]
    p = len(y_group) / len(y)
    delta = [-1 / (1 - p) / len(y) * t for t in total]
    assert len(delta) == r * len(params)
    return torch.cat([(w - d).detach().reshape(-1) for w, d in zip(params, delta)])


@pytest.mark.parametrize("per_example", [True, False])
def test_reference_mode_applies_what_the_reference_code_applies(per_example):
    x, y = toy_data()
    model = tiny_mlp(x, y)
    group, kw = torch.arange(2), dict(depth=30, scale=5.0, damping=0.05)
    got = influence.group_influence_update(model, x[group], y[group], x, y, mode="reference", solver="lissa",
                                           repeats=3, per_example=per_example,
                                           generator=torch.Generator().manual_seed(0), **kw)
    got = parameters_to_vector(got.parameters()).detach()
    if per_example:
        expected = literal_reference_update(model, x[group], y[group], x, y, 30, 5.0, 0.05, 3,
                                            torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        assert rel_err(got, expected) < 1e-10
    # Without the extra term (v detached) and with all repeats averaged, the update would differ clearly.
    v = influence.summed_gradient(model, x[group], y[group])
    plain = influence.lissa_inverse_hvp(model, x, y, v, depth=30, scale=5.0, damping=0.05 / 5.0, repeats=1,
                                        generator=torch.Generator().manual_seed(0))
    theta = parameters_to_vector(model.parameters()).detach()
    assert rel_err(got - theta, plain * 5.0 / 3 / (len(y) - 2)) > 0.02


def test_reference_recursion_estimates_s_times_the_inverse_with_damping_d_times_s():
    """Full-batch, at an optimum (the extra term vanishes with the mean gradient): one run of the reference's
    recursion is s·(H + d·s·I)⁻¹v, and the reported residual is of run/s against (H + d·s·I)."""
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    hess, d, s = exact_hessian(model, x, y), 0.01, 2.0
    v = influence.summed_gradient(model, x[:1], y[:1])
    run = influence.reference_lissa(model, x[:1], y[:1], x, y, depth=1500, scale=s, damping=d, batch_size=len(y))
    assert rel_err(run, s * torch.linalg.solve(hess + d * s * eye_like(hess), v)) < 1e-6
    est = influence.group_estimate(model, x[:1], y[:1], x, y, mode="reference", solver="lissa", depth=1500,
                                   scale=s, damping=d, repeats=10, batch_size=len(y))
    assert rel_err(est.step, run / 10) < 1e-12 and est.damping == pytest.approx(d * s)
    assert influence.relative_residual(model, x, y, est.solution, est.v, est.damping) < 1e-6


# ---------------------------------------------------------------- the group update

def exact_update(model, x_group, y_group, x, y, damping):
    hess = exact_hessian(model, x, y)
    g = influence.summed_gradient(model, x_group, y_group)
    return torch.linalg.solve(hess + damping * eye_like(hess), g) / (len(y) - len(y_group))


def test_stochastic_group_influence_agrees_with_exact_inverse_hessian():
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    group = torch.arange(5)
    expected = exact_update(model, x[group], y[group], x, y, damping=0.01)
    updated = influence.group_influence_update(model, x[group], y[group], x, y, solver="lissa", depth=2000,
                                               scale=20.0, damping=0.01, repeats=10, batch_size=1,
                                               generator=torch.Generator().manual_seed(0), per_example=False)
    delta = parameters_to_vector(updated.parameters()) - parameters_to_vector(model.parameters())
    assert rel_err(delta.detach(), expected) < 0.15


def test_per_example_and_summed_runs_agree_with_the_full_hessian():
    x, y = toy_data()
    model = tiny_mlp(x, y)
    group = torch.arange(3)
    kw = dict(solver="lissa", depth=600, scale=2.0, damping=0.1, repeats=1, batch_size=len(y))
    a, b = (influence.group_inverse_hvp(model, x[group], y[group], x, y, per_example=p, **kw)
            for p in (True, False))
    assert rel_err(a, b) < 1e-8
    assert rel_err(a / (len(y) - 3), exact_update(model, x[group], y[group], x, y, damping=0.1)) < 1e-6


def test_group_influence_reports_the_residual_of_the_summed_solve():
    x, y = toy_data()
    model = tiny_mlp(x, y)
    group = torch.arange(3)
    expected = exact_update(model, x[group], y[group], x, y, damping=0.1)
    updated, stats = influence.group_influence(model, x[group], y[group], x, y, residual_batch=len(y),
                                               damping=0.1, tol=1e-9)
    delta = parameters_to_vector(updated.parameters()) - parameters_to_vector(model.parameters())
    assert rel_err(delta.detach(), expected) < 1e-7
    assert stats["cg_converged"] and stats["ihvp_residual"] < 1e-8
    _, noisy = influence.group_influence(model, x[group], y[group], x, y, residual_batch=len(y), solver="lissa",
                                         damping=0.1, depth=200, scale=10.0, repeats=1,
                                         generator=torch.Generator().manual_seed(0))
    assert noisy["ihvp_residual"] > 0.1 and "cg_iterations" not in noisy  # 200 noisy steps: far from converged


def test_update_approximates_retraining_without_the_group():
    """On a convex problem the first-order update lands much closer to the retrained optimum than θ."""
    x, y = toy_data(m=400)
    model = fit_full_batch(logistic(), x, y)
    keep = torch.arange(8, len(y))
    oracle = fit_full_batch(logistic(), x[keep], y[keep])
    updated = influence.group_influence_update(model, x[:8], y[:8], x, y, damping=1e-4, tol=1e-8)
    # Both fits start from the same initialisation, so they agree along the softmax's null direction.
    theta, new, target = (parameters_to_vector(m.parameters()) for m in (model, updated, oracle))
    assert (new - target).norm() < 0.2 * (theta - target).norm()


def test_update_returns_an_eval_copy_and_leaves_the_model_alone():
    x, y = toy_data()
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double().train()
    before = parameters_to_vector(model.parameters()).clone()
    updated = influence.group_influence_update(model, x[:2], y[:2], x, y, solver="lissa", depth=50, scale=10.0,
                                               repeats=1, batch_size=len(y))
    assert not updated.training and model.training
    assert torch.equal(parameters_to_vector(model.parameters()), before)
    assert not torch.equal(parameters_to_vector(updated.parameters()), before)
    empty, stats = influence.group_influence(model, x[:0], y[:0], x, y, residual_batch=10)
    assert torch.equal(parameters_to_vector(empty.parameters()), before) and stats == {}


# ---------------------------------------------------------------- divergence

def test_divergence_is_a_clear_training_error():
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    v = influence.summed_gradient(model, x[:1], y[:1])
    with pytest.raises(TrainingError, match="LiSSA diverged") as err:  # scale far below the top eigenvalue
        influence.lissa_inverse_hvp(model, x, y, v, depth=2000, scale=0.01, repeats=1, batch_size=len(y))
    assert "\n" not in str(err.value)
    with pytest.raises(TrainingError, match="non-finite vector"):
        influence.lissa_inverse_hvp(model, x, y, v * float("nan"), depth=10, scale=10.0)


@pytest.mark.parametrize("fraction", [0.9, 0.95])
def test_a_recursion_that_grows_under_the_norm_guard_fails(fraction, monkeypatch):
    """Scale just below (λmax + λ)/2: the top direction grows by |1 − (λmax + λ)/s| > 1 a step. In 35 steps
    the estimate is 12–450 times the exact one yet far below the 10⁶·‖v‖ guard; the growth rule catches it."""
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    hess = exact_hessian(model, x, y)
    scale = fraction * (float(torch.linalg.eigvalsh(hess).max()) + 0.01) / 2
    v = influence.summed_gradient(model, x[:1], y[:1])
    kw = dict(depth=35, scale=scale, damping=0.01, repeats=1, batch_size=len(y))
    with pytest.raises(TrainingError, match=r"grew .*x from step .*; raise `scale`") as err:
        influence.lissa_inverse_hvp(model, x, y, v, **kw)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(influence, "GROWTH_FACTOR", float("inf"))  # without the rule: a silent bad update
    h = influence.lissa_inverse_hvp(model, x, y, v, **kw)
    exact = torch.linalg.solve(hess + 0.01 * eye_like(hess), v)
    assert float(h.norm() / exact.norm()) > 10 and float(h.norm() / v.norm()) < 1e6


@pytest.mark.parametrize("mode,scale,damping", [("corrected", 100.0, 1.0), ("reference", 100.0, 0.01),
                                                ("corrected", 10.0, 0.1)])
def test_noisy_batch_one_lissa_that_converges_does_not_fail(mode, scale, damping):
    """The Fashion-MNIST defaults of each mode, and a scale whose batch-1 steps are often unstable (an example's
    own Hessian here has eigenvalues from −15 to 27, far beyond 2s = 20) while the mean recursion converges."""
    x, y = toy_data()
    model = tiny_mlp(x, y)
    for seed in range(4):
        group = torch.arange(seed, seed + 1)
        est = influence.group_estimate(model, x[group], y[group], x, y, solver="lissa", mode=mode, depth=2000,
                                       scale=scale, damping=damping, repeats=1,
                                       generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(est.step).all()


def test_norm_guard_is_configurable():
    x, y = toy_data()
    model = fit_full_batch(logistic(), x, y)
    v = influence.summed_gradient(model, x[:1], y[:1])
    kw = dict(depth=200, scale=5.0, damping=0.01, repeats=1, batch_size=len(y))
    influence.lissa_inverse_hvp(model, x, y, v, **kw)
    with pytest.raises(TrainingError, match="limit 1.5x"):  # the true inverse has a norm > 1.5 |v|
        influence.lissa_inverse_hvp(model, x, y, v, max_norm_ratio=1.5, **kw)


# ---------------------------------------------------------------- defaults and settings

@pytest.mark.parametrize("dataset,n,expected", [
    ("fashion", 20, dict(scale=100.0, depth=2000)), ("fashion", 100, dict(scale=100.0, depth=1000)),
    ("mnist", 5, dict(scale=25.0, depth=2000)), ("mnist", 100, dict(scale=25.0, depth=1000)),
    ("cifar10", 3, dict(scale=100.0, depth=1000)), ("fashion_mnist", 100, dict(scale=100.0, depth=1000)),
])
def test_reference_defaults(dataset, n, expected):
    assert influence.defaults_for(dataset, n, "reference") == dict(expected, mode="reference", solver="lissa",
                                                                   damping=0.01, repeats=10)
    corrected = influence.defaults_for(dataset, n)
    assert corrected == dict(expected, mode="corrected", solver="cg", damping=0.01 * expected["scale"],
                             repeats=10, tol=1e-3, max_iter=100)


def test_bad_settings_are_user_errors():
    x, y = toy_data()
    model = logistic()
    v = torch.ones(21, dtype=torch.float64)
    for bad in (dict(depth=0), dict(scale=0.0), dict(damping=-1.0), dict(repeats=0),
                dict(scale=float("inf"))):
        with pytest.raises(SpuriousError):
            influence.lissa_inverse_hvp(model, x, y, v, **{**dict(depth=10, scale=10.0), **bad})
    for bad in (dict(damping=-1.0), dict(tol=0.0), dict(max_iter=0)):
        with pytest.raises(SpuriousError, match="CG"):
            influence.cg_inverse_hvp(model, x, y, v, **{**dict(damping=0.1), **bad})
    with pytest.raises(SpuriousError, match="smaller than the training set"):
        influence.group_influence_update(model, x, y, x, y, depth=10, scale=10.0)
    with pytest.raises(SpuriousError, match="solver 'newton' is not one of cg, lissa"):
        influence.group_estimate(model, x[:1], y[:1], x, y, solver="newton")
    with pytest.raises(SpuriousError, match="mode 'reference' .* needs solver lissa"):
        influence.group_estimate(model, x[:1], y[:1], x, y, mode="reference", solver="cg")
    with pytest.raises(SpuriousError, match="svhn"):
        influence.defaults_for("svhn", 10)
    with pytest.raises(SpuriousError, match="mode 'exact'"):
        influence.defaults_for("fashion", 10, "exact")
