"""A small real ground-truth folder for tests: a tiny GPT-2 (saved random init) fully fine-tuned on
``make_records`` rows written as a ``path:`` task, with LDS subsets (no LOO, no PBRF by default).

Measured: builds in about 4 s on one thread with 10 subsets; EK-FAC reaches LDS about 0.6 on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import make_records
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.groundtruth import GroundTruthConfig, build_groundtruth


def build_tiny_groundtruth(root: Path, n_train: int = 24, n_queries: int = 8, n_subsets: int = 10, **settings) -> Path:
    """Build (or reuse) ``root/gt`` and return its path; ``settings`` override :class:`GroundTruthConfig` fields."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny(root / "model", "gpt2")
    for name, rows in (("train", make_records(n_train, seed=1)), ("test", make_records(n_queries, seed=2, prefix="q"))):
        lines = [
            json.dumps({"id": r.id, "prompt": r.prompt, "completion": r.completion, "label": r.label}) for r in rows
        ]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = GroundTruthConfig(
        task=f"path:{root / 'train.jsonl'}:{root / 'test.jsonl'}",
        out=str(root / "gt"),
        model=str(model),
        lora_rank=None,
        epochs=3,
        learning_rate=1e-2,
        n_subsets=n_subsets,
        loo_rows=0,
        batch_size=8,
        max_length=64,
    )
    for key, value in settings.items():
        setattr(config, key, value)
    build_groundtruth(config)
    return root / "gt"
