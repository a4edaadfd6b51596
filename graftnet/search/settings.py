"""How a search runs, apart from the base config and the space: objectives, constraint, sampler,
pruner, workers and storage. Saved as SEARCH/search.yaml so that `--resume` and every worker on
every machine run the same search."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..io import atomic_write_text

# objective -> Optuna direction; latency is ONNX Runtime on this CPU (export.runtime.measure_latency)
OBJECTIVES = {"val_acc": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
# grid: every combination of a space whose entries are all categorical or bool, each once (random
# sampling of a small space draws the same combination again and again)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class SearchSettings:
    objectives: list[str] = field(default_factory=lambda: ["val_acc"])
    max_latency_ms: float | None = None   # a constraint: trials slower than this are infeasible
    latency_batch: int = 1                # the batch size latency_ms is measured at
    sampler: str = "tpe"
    pruner: str = "median"                # stops poor trials early on per-epoch validation accuracy
    workers: int = 1                      # local worker processes sharing the study
    storage: str | None = None            # None: SEARCH/study.journal; else an Optuna storage URL
    seed: int = 0
    # the time limit is when trials must end, not start: no trial starts when the median trial so far
    # would cross it (`graft auto`, whose next stages own the time after the search's share)
    end_by_deadline: bool = False

    def __post_init__(self):
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or self.objectives[0] != "val_acc":
            raise ConfigError(f"search objectives {self.objectives}: val_acc first, then any of "
                              f"{', '.join(o for o in OBJECTIVES if o != 'val_acc')}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"search sampler {self.sampler!r}: one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"search pruner {self.pruner!r}: one of {', '.join(PRUNERS)}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise ConfigError(f"--max-latency-ms {self.max_latency_ms}: must be positive")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: at least 1")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def measures_latency(self) -> bool:
        return "latency_ms" in self.objectives or self.max_latency_ms is not None

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / "search.yaml", yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    @classmethod
    def load(cls, folder: Path) -> "SearchSettings":
        path = Path(folder) / "search.yaml"
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})
