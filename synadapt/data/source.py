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
    """Use at most this many problems (0 = all). Embedded splits are sampled (seeded) across all levels."""
    part: str = ""
    """``"k/n"``: only the k-th of n interleaved parts (problem i is in part i mod n), taken before ``limit``; two
    stages given different parts of one split see disjoint problems (AdaR1 samples its preference data on questions
    the short model was not fine-tuned on). Interleaving keeps each level's share in a level-ordered split."""

    def __post_init__(self):
        # Checked when the config is built (YAML, CLI or dataclasses.replace), as TaskConfig does: a pipeline's
        # stage_configs then names a bad part before any stage runs.
        if self.part:
            k, sep, n = self.part.partition("/")
            if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
                raise ValueError(f"data.part must be 'k/n' with 0 <= k < n, got {self.part!r}")

    def _part(self, problems: list[dict]) -> list[dict]:
        if not self.part:
            return problems
        k, n = map(int, self.part.split("/"))
        return problems[k::n]

    def load(self, task: TaskConfig) -> list[dict]:
        """The problems, with malformed rows of a file reported in the log (never silently dropped)."""
        if not self.path:
            splits = make_splits(task)
            if self.split not in splits:
                raise ValueError(f"unknown embedded split {self.split!r}; choose from {sorted(splits)}")
            problems = self._part(splits[self.split])
            if 0 < self.limit < len(problems):
                # Splits are ordered by level: a seeded sample (kept in order) covers every level.
                keep = sorted(random.Random(task.seed).sample(range(len(problems)), self.limit))
                problems = [problems[i] for i in keep]
            return problems
        report = load_problems(self.path, adapter=self.adapter, field_map=self.field_map or None, split=self.split,
                               limit=None if self.part else self.limit or None)
        log.info(report.summary())
        problems = self._part(report.problems)
        if not problems:
            raise ValueError(f"no valid problems in {self.path!r} (split {self.split!r}, adapter {self.adapter!r}"
                             f"{', part ' + self.part if self.part else ''})")
        return problems[:self.limit or None]  # without a part, load_problems has applied the limit already


def parse_source(spec: str, split: str = "test") -> DataSource:
    """``"adapter:path"`` or a plain ``"path"`` (generic adapter) as a :class:`DataSource` of ``split``."""
    adapter, sep, path = spec.partition(":")
    if sep and adapter in ADAPTERS:
        return DataSource(path=path, split=split, adapter=adapter)
    return DataSource(path=spec, split=split)
