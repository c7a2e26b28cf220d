"""Influence estimators: every module here is discovered and its ``@registered`` classes listed.

The modules that ship with ifbench are named in :data:`SHIPPED`; their cells are keyed by each
estimator's ``version``. Any other module placed in this package is a user's plug-in: it is
discovered the same way, but keyed (like a ``--plugin`` file) by a hash of its source, so editing
it re-runs its cells, and ``ifbench list`` names the file.
"""

SHIPPED = frozenset({
    "api",
    "arnoldi",
    "autodiff",
    "base",
    "baselines",
    "datainf",
    "fastif",
    "gif",
    "group",
    "influence",
    "kfac",
    "knn",
    "options",
    "peer_captum",
    "peer_dattri",
    "peer_kronfluence",
    "peer_traker",
    "representer",
    "solvers",
    "target_params",
    "tracin",
    "trak",
})
