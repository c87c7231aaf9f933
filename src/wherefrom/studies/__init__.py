"""Studies above the engine: the benchmark and its tasks, metrics, diagnose (methods against exact
influence), ground truth (LDS, LOO, PBRF), the reference study's analyses, and the demo."""
