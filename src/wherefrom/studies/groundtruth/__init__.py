"""Ground truth for attribution: retraining harness, LDS, leave-one-out, PBRF, and evaluation.

* :mod:`.retrain`: :class:`Retrainer` (``key()``, ``train_and_measure(indices, seed)``),
  :class:`FinetuneRetrainer`, :class:`FunctionRetrainer`, :func:`run_jobs` (cached, resumable, parallel);
* :mod:`.lds`: LDS and LOO correlation math (:func:`sample_subsets`, :func:`lds_per_query`, ...);
* :mod:`.build`: :class:`GroundTruthConfig`, :func:`build_groundtruth`, :class:`GroundTruth`;
* :mod:`.evaluate`: :func:`evaluate_scores`, :func:`evaluate`;
* :mod:`.pbrf`: the proximal Bregman response function (Bae et al., 2022).
"""

from wherefrom.studies.groundtruth.build import GroundTruth, GroundTruthConfig, build_groundtruth
from wherefrom.studies.groundtruth.evaluate import evaluate, evaluate_scores
from wherefrom.studies.groundtruth.lds import (
    lds_per_query,
    loo_correlations,
    loo_effect,
    loo_noise,
    sample_subsets,
    summarize,
)
from wherefrom.studies.groundtruth.retrain import (
    FinetuneRetrainer,
    FunctionRetrainer,
    Retrainer,
    measure_queries,
    run_jobs,
)

__all__ = [
    "FinetuneRetrainer",
    "FunctionRetrainer",
    "GroundTruth",
    "GroundTruthConfig",
    "Retrainer",
    "build_groundtruth",
    "evaluate",
    "evaluate_scores",
    "lds_per_query",
    "loo_correlations",
    "loo_effect",
    "loo_noise",
    "measure_queries",
    "run_jobs",
    "sample_subsets",
    "summarize",
]
