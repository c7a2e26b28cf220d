"""Everything an estimator author needs, from one module.

A plug-in estimator is one class::

    from estimators.api import Estimator, FitContext, registered

    @registered("my-estimator")
    class Mine(Estimator):
        def fit(self, ctx: FitContext) -> None: ...
        def score(self, queries: Split, train_idx: Tensor) -> Tensor: ...   # [Q, R] float32

Sign convention: ``score`` predicts ``loss(θ₋z, z_q) − loss(θ̂, z_q)`` for removing training point z
(positive: z helped the query), and so do group scores, updates (Δθ for the removal) and
self-influence (the rise of z's own loss).

What is here:

- :class:`Estimator` (subclass it), :func:`registered` (name it), :class:`NotApplicable` (raise it from
  ``fit`` when the estimator cannot run on a task; the cell is recorded as not applicable), :class:`OverLimit`
  (raise it instead when the method applies but one of its configured limits refuses the run, naming the
  limit: ``OverLimit(message, limit="max_parameters = 500,000")``; shown as *over a limit*).
- :class:`FitContext`: the model, θ̂, the per-example loss, ``l2``, the training :class:`Split`, a seed,
  checkpoints, ``exact_hessian()`` on convex tasks, ``embed`` feature spaces, the head view.
- Capabilities an estimator declares in ``capabilities`` (the runner asks only for what is declared):
  :data:`SINGLE` (``score``), :data:`GROUP` (``score_groups``), :data:`PARAMETER_UPDATE` (``update``),
  :data:`SELF_INFLUENCE` (``self_influence``).
- ``Estimator.uses_head_view = True`` says the estimator needs only θ̂ (no checkpoints), so on a deep task,
  restricted to the head's parameters, the runner may give it the *head view*: features computed once by
  the frozen trunk, and the head alone as ``ctx.model`` (same influence, far cheaper).
- ``diagnostics()`` returns numbers recorded with each cell; the key ``"n_parameters"`` (how many of the
  model's parameters the estimator works on) is the leaderboard's *params* column.
- Autodiff helpers on the flattened parameters: :class:`FlatLoss` (``FlatLoss.of(ctx.model, ctx.params,
  ctx.loss, names)``) and :func:`per_example_grads` (``[len(split), P]`` by ``torch.func``).

``ifbench check-estimator NAME --plugin FILE`` checks each declared capability against a tiny exact problem.
"""

from __future__ import annotations

from bench.registry import registered
from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import (
    GROUP,
    PARAMETER_UPDATE,
    SELF_INFLUENCE,
    SINGLE,
    Estimator,
    FitContext,
    NotApplicable,
    OverLimit,
)
from tasks.base import Params, Split

__all__ = ["GROUP", "PARAMETER_UPDATE", "SELF_INFLUENCE", "SINGLE", "Estimator", "FitContext", "FlatLoss",
           "NotApplicable", "OverLimit", "Params", "Split", "per_example_grads", "registered"]
