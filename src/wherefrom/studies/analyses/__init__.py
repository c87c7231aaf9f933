"""The reference study's three analyses (Li et al. 2024) on a ``wherefrom bench`` folder.

* :func:`run_ihvp` (a): iHVP approximation error of each influence method against an exact (or tight
  ``cg``) reference at one damping, paired with the method's bench metric;
* :func:`run_convergence` (b): the bench metric of each method at every per-epoch checkpoint;
* :func:`run_weights` (c): the size of the fine-tuning weight change per module against the change in
  the model's outputs on the test prompts, with a per-module ablation.

Each reads ``bench.json`` for the config, writes ``<analysis>.json`` and ``<analysis>.md`` into the
bench folder and caches its units of work under ``seed-<s>/<analysis>/`` (a rerun resumes).
"""

from wherefrom.studies.analyses.common import Bench, open_bench
from wherefrom.studies.analyses.convergence import ConvergenceSettings, run_convergence
from wherefrom.studies.analyses.ihvp import IhvpSettings, influence_methods, run_ihvp
from wherefrom.studies.analyses.weights import run_weights

ANALYSES = ("ihvp", "convergence", "weights")

__all__ = [
    "ANALYSES",
    "Bench",
    "ConvergenceSettings",
    "IhvpSettings",
    "influence_methods",
    "open_bench",
    "run_convergence",
    "run_ihvp",
    "run_weights",
]
