"""TRAK against its closed form on toy-logreg (multinomial logistic regression, 15 parameters)."""

import dataclasses

import torch

from estimators.trak import Trak, TrakConfig, margin


def fitted(ctx, **options):
    estimator = Trak(TrakConfig(**options))
    estimator.fit(ctx)
    return estimator


def closed_form(toy) -> torch.Tensor:
    """(1 − p_q) · g_qᵀ (GᵀG + n·l2·I)⁻¹ g_z · (1 − p_z), with the margin's gradient written out by hand:
    ∂f/∂logits = e_y − softmax over the other classes (0 at y); ∂logits/∂W = x, ∂logits/∂b = 1."""
    weight, bias = toy.ctx.params["weight"].double(), toy.ctx.params["bias"].double()

    def grads_and_p(split):
        logits = split.inputs.double() @ weight.T + bias
        onehot = torch.nn.functional.one_hot(split.targets, logits.shape[1]).double()
        others = torch.softmax(logits.masked_fill(onehot.bool(), float("-inf")), dim=1)
        slope = onehot - others  # [b, K]
        grads = torch.cat([(slope[:, :, None] * split.inputs.double()[:, None, :]).flatten(1), slope], dim=1)
        return grads, torch.softmax(logits, 1).gather(1, split.targets[:, None])[:, 0]

    train_grads, train_p = grads_and_p(toy.ctx.train)
    query_grads, query_p = grads_and_p(toy.queries)
    n = len(toy.ctx.train)
    kernel = train_grads.T @ train_grads + n * toy.ctx.l2 * torch.eye(train_grads.shape[1], dtype=torch.float64)
    tau = query_grads @ torch.linalg.solve(kernel, train_grads.T) * (1 - train_p)
    return (1 - query_p)[:, None] * tau


def test_margin_is_the_log_odds_of_the_label():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    expected = torch.log(torch.stack([p[0, 0] / (1 - p[0, 0]), p[1, 2] / (1 - p[1, 2])]))
    torch.testing.assert_close(margin(logits, torch.tensor([0, 2])), expected)


def test_trak_without_projection_on_one_model_is_its_gauss_newton_closed_form(toy):
    trak = fitted(toy.ctx, projection_dim=0)
    scores = trak.score(toy.queries, toy.train_idx)
    assert scores.dtype == torch.float32
    assert {k: trak.diagnostics()[k] for k in ("models", "n_parameters", "features", "independent_models")} == {
        "models": 1.0, "n_parameters": 15.0, "features": 15.0, "independent_models": 0.0}
    torch.testing.assert_close(scores.double(), closed_form(toy), rtol=1e-5, atol=1e-9)  # float32 output
    # a projection at least as wide as the parameters is no projection
    torch.testing.assert_close(fitted(toy.ctx, projection_dim=15).score(toy.queries, toy.train_idx), scores)


def test_projected_trak_is_seeded_and_keeps_k_features(toy):
    first, second = fitted(toy.ctx, projection_dim=8), fitted(toy.ctx, projection_dim=8)
    assert first.diagnostics()["features"] == 8.0
    torch.testing.assert_close(first.score(toy.queries, toy.train_idx), second.score(toy.queries, toy.train_idx),
                               rtol=0, atol=0)
    other = fitted(dataclasses.replace(toy.ctx, seed=toy.ctx.seed + 1), projection_dim=8)
    assert not torch.equal(other.score(toy.queries, toy.train_idx), first.score(toy.queries, toy.train_idx))


def test_self_influence_is_the_diagonal_of_train_on_train_scores(toy):
    trak = fitted(toy.ctx, projection_dim=0, checkpoints=2)
    idx = toy.train_idx[:12]
    full = trak.score(toy.ctx.train.subset(idx), idx)
    torch.testing.assert_close(trak.self_influence(idx), torch.diagonal(full), rtol=1e-5, atol=1e-9)


def test_checkpoints_join_the_ensemble(toy):
    saved = toy.ctx.checkpoints
    assert len(saved) >= 2
    assert fitted(toy.ctx, checkpoints=2).diagnostics()["models"] == 3.0
    assert fitted(toy.ctx, checkpoints=len(saved) + 5).diagnostics()["models"] == 1.0 + len(saved)  # all there are
    as_theta = dataclasses.replace(toy.ctx, params=saved[-1].params)  # a checkpoint equal to θ̂ is not a second model
    assert fitted(as_theta, checkpoints=len(saved)).diagnostics()["models"] == float(len(saved))
    assert not Trak.runs_on_head_view(TrakConfig(checkpoints=1)) and Trak.runs_on_head_view(TrakConfig())
