"""A method made to fail as it runs (out of memory, say), for the studies' tests of failed rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import method_settings
from wherefrom.studies import bench


@contextmanager
def failing_methods(fails: Callable[[str, AttributionConfig], bool]) -> Iterator[None]:
    """Within the block, ``bench.make_method`` (which ``bench``, ``evaluate`` and ``tune`` call for every row) raises
    ``RuntimeError("out of memory, say")`` for a method and settings where ``fails(name, config)`` is true (``config``
    with the method's setting options applied: a tune grid's ``damping``)."""
    made = bench.make_method

    def failing(name: str, model, tokenizer, config: AttributionConfig, progress: Progress = no_progress, **options):
        if fails(name, method_settings(name, config, options, ("checkpoints",))[0]):  # with its setting options
            raise RuntimeError("out of memory, say")
        return made(name, model, tokenizer, config, progress, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "make_method", failing)
        yield
