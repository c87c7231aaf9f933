"""Named attribution methods (the registry) and the estimators that are not curvature strategies:
projected gradients (TRAK, LoGra), TracIn, representation similarity and BM25."""
