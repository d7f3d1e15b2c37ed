"""The best-model keeper, a part of the Controller: the best scored round so far, saved where the admin downloads
it (the persistor's best model) and where a resumption finds it (the run's model files)."""

from __future__ import annotations

import math
from typing import Callable, Optional


class BestModelKeeper:
    """save(params, meta): keeps a new best model (the persistor's save_best and the run's copy); best: (round, score)
    to start from (a resumed run's)."""

    def __init__(self, score_name: str, save: Callable[[dict, dict], None], best: tuple = (None, -math.inf)):
        self.score_name, self._save = score_name, save
        self.round, self.score = best
        self.model: Optional[tuple] = None  # (params, meta) of this job's best model, for the OOD calibration

    def offer(self, round_num: int, score: float, model, source: Optional[str], sha: str) -> bool:
        """Keep `model` (round_num from 1) if it scores above the best so far (NaN never does); True if kept."""
        if not score > self.score:
            return False
        self.round, self.score = round_num, score
        meta = {**model.meta, "score": score, "score_name": self.score_name, "score_source": source, "sha256": sha}
        self.model = (model.params, meta)
        self._save(model.params, meta)
        return True

    def summary(self) -> str:
        where = self.round if self.round is not None else "-"
        return f"best {self.score_name} {self.score:.4f} at round {where}"
