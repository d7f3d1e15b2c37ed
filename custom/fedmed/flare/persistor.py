"""Server-side model persistor: initial weights (fresh DenseNet-121 or a weights file) and per-round/best saves."""

from __future__ import annotations

from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from fedmed.job.jobconfig import JobConfig
from fedmed.job.tasks import get_task
from fedmed.models.network import build_densenet121, load_numpy_state, state_to_numpy

# Re-exported: the controller and executor import them from here.
from fedmed.models.weights import params_sha256, save_state  # noqa: F401

GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_model.pt"


class FedMedModelPersistor(ModelPersistor):
    def __init__(self, job: dict):
        """Args:
        job: the job's settings, fedmed.job.jobconfig.JobConfig.to_dict() (a JobConfig is taken too), as the Controller
            takes them. Read here: task (its classifier outputs), norm and seed (a fresh DenseNet-121), and the
            weights file to start from (cross_site_eval_only, else initial_weights; no weights are ever downloaded).
        """
        super().__init__()
        config = JobConfig.from_dict(job)  # raises naming a bad or unknown setting
        self.job = config.to_dict()  # same name as the argument: FedJob serialises attributes by name
        self.config = config
        self.num_outputs = get_task(config.task).num_outputs
        # A model file to evaluate across sites is what the server starts from; a recorded run to evaluate is
        # resolved by the Controller from its kept models (JobConfig.cross_site_eval_run), not loaded here.
        self.initial_weights = config.cross_site_eval_only or config.initial_weights

    def _model_dir(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_app_dir(fl_ctx.get_job_id()))

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        torch.manual_seed(self.config.seed)
        model = build_densenet121(self.num_outputs, norm=self.config.norm)
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
        save_state(model[ModelLearnableKey.WEIGHTS], path, model.get(ModelLearnableKey.META), reuse=True)
        self.log_info(fl_ctx, f"global model saved to {path}")

    def save_best(self, params: dict, meta: dict, fl_ctx: FLContext) -> Path:
        path = self._model_dir(fl_ctx) / BEST_MODEL_FILE
        save_state(params, path, meta, reuse=True)
        return path
