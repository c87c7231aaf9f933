"""The influence engine: :class:`~wherefrom.engine.api.Attributor` (fit a curvature, precondition
queries, score training rows) and :class:`~wherefrom.engine.run.Run` (the same in a run directory)."""
