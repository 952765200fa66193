"""Where a stage reads its questions: the embedded task by default, or any data set ``load_problems`` reads."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from synadapt.data.problems import ADAPTERS, load_problems
from synadapt.data.task import TaskConfig, make_splits

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """A set of problems for one stage."""

    path: str = ""
    """JSONL/Parquet file, ``save_to_disk`` directory or HF data set id; empty means the embedded task's ``split``."""
    split: str = "train"
    """Split: of the embedded task (train/val/test), or of an HF data set."""
    adapter: str = "generic"
    """Loader adapter for ``path`` (generic, gsm8k, math, aime, amc23, olympiadbench, minerva)."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Schema field → source column, e.g. ``{"question": "problem", "short_cot": "short_solution"}``."""
    limit: int = 0
    """Use at most this many problems (0 = all). Embedded splits are subsampled evenly across levels."""

    def load(self, task: TaskConfig) -> list[dict]:
        """The problems, with malformed rows of a file reported in the log (never silently dropped)."""
        if not self.path:
            splits = make_splits(task)
            if self.split not in splits:
                raise ValueError(f"unknown embedded split {self.split!r}; choose from {sorted(splits)}")
            problems = splits[self.split]
            if 0 < self.limit < len(problems):
                # Splits are ordered by level: a seeded sample (kept in order) covers every level.
                keep = sorted(random.Random(task.seed).sample(range(len(problems)), self.limit))
                problems = [problems[i] for i in keep]
            return problems
        report = load_problems(self.path, adapter=self.adapter, field_map=self.field_map or None, split=self.split,
                               limit=self.limit or None)
        log.info(report.summary())
        if not report.problems:
            raise ValueError(f"no valid problems in {self.path!r} (split {self.split!r}, adapter {self.adapter!r})")
        return report.problems


def parse_source(spec: str, split: str = "test") -> DataSource:
    """``"adapter:path"`` or a plain ``"path"`` (generic adapter) as a :class:`DataSource` of ``split``."""
    adapter, sep, path = spec.partition(":")
    if sep and adapter in ADAPTERS:
        return DataSource(path=path, split=split, adapter=adapter)
    return DataSource(path=spec, split=split)
