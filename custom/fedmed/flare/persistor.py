"""Server-side model persistor: initial weights (fresh DenseNet-121 or a weights file) and per-round/best saves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from fedmed.models.network import build_densenet121, load_numpy_state, state_to_numpy

# Re-exported: the controller and executor import them from here.
from fedmed.models.weights import params_sha256, save_state  # noqa: F401

GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_model.pt"


class FedMedModelPersistor(ModelPersistor):
    def __init__(
        self, num_outputs: int = 14, initial_weights: Optional[str] = None, seed: int = 0, norm: str = "batch"
    ):
        """Args:
        num_outputs: classifier outputs (14 findings for chest X-ray).
        initial_weights: optional path to a torch state dict (e.g. a previous run's best_model.pt) to start from;
            no weights are ever downloaded.
        seed: torch seed for a fresh initialisation.
        norm: DenseNet-121 normalisation, "batch" or "group"; same as the sites'.
        """
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        self.num_outputs = num_outputs
        self.initial_weights = initial_weights
        self.seed = seed
        self.norm = norm

    def _model_dir(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_app_dir(fl_ctx.get_job_id()))

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        torch.manual_seed(self.seed)
        model = build_densenet121(self.num_outputs, norm=self.norm)
        if self.initial_weights:
            path = Path(self.initial_weights)
            if not path.is_file():
                raise FileNotFoundError(f"initial_weights file not found: {path}")
            blob = torch.load(path, map_location="cpu", weights_only=True)
            state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
            load_numpy_state(model, {k: v.numpy() for k, v in state.items()})
            self.log_info(fl_ctx, f"initial weights loaded from {path}")
        return make_model_learnable(state_to_numpy(model), {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        path = self._model_dir(fl_ctx) / GLOBAL_MODEL_FILE
        save_state(model[ModelLearnableKey.WEIGHTS], path, model.get(ModelLearnableKey.META))
        self.log_info(fl_ctx, f"global model saved to {path}")

    def save_best(self, params: dict, meta: dict, fl_ctx: FLContext) -> Path:
        path = self._model_dir(fl_ctx) / BEST_MODEL_FILE
        save_state(params, path, meta)
        return path
