"""Federated optimisation on top of the robust round: FedOpt at the server, FedProx and SCAFFOLD at the sites.

Pure core (no NVFlare import): plain functions of numpy dicts and torch modules, called by the round engine
(fedmed.server.rounds, the server optimiser and the server's control variate) and by a site's round (fedmed.site.site_round, the
proximal term and the control-variate correction), so the NVFlare adapters and the in-process federation
(fedmed.sim.inprocess) run the same code.

FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021). The round's robust aggregate (geometric median,
FedAvg, ... whatever RoundRules.aggregation chose after screening and trust) is read as one step of a server
optimiser: the pseudo-gradient g = global - aggregate, and FedAdam / FedYogi keep the first and second moments of g
across rounds (no bias correction, v starting at tau^2, as in the paper's Algorithm 2). Only clear floating-point
parameters are stepped: BatchNorm running statistics are estimates, not weights (they are taken as aggregated), and
CKKS-encrypted layers are combined by the plain weighted sum (the server cannot apply Adam's non-linear step to
ciphertexts it cannot read). The moments live in the server's round engine for one job; they are not saved with a
run's model files, so a job with a server optimiser refuses resume_run (fedmed.job.jobconfig) rather than restart them
at zero silently.

FedProx (Li et al. 2020): the site's local objective gets mu/2 ||w - w_global||^2, whose gradient mu (w - w_global)
is added to each step's gradient. It depends on no example, so under DP-SGD it is added after Opacus clipped the
per-sample gradients and added the noise (DPOptimizer's step hook): the released model is a function of the
privatised gradients, the global model (public to the site) and mu, i.e. post-processing, and the accountant's
charge is unchanged. Adding it to the loss instead would clip it per sample with the data's gradient, which biases
both.

SCAFFOLD (Karimireddy et al. 2020, option II). The server keeps a control variate c, each site its own c_i; each local
step is corrected by -lr (c - c_i) after the optimiser's step, and after K local steps at learning rate lr the site
sets c_i+ = c_i - c + (x - y_i) / (K lr) and sends delta_i = c_i+ - c_i with its update. With Adam as the local
optimiser (fedmed's), (x - y_i) / (K lr) is the mean of Adam's normalised step rather than of raw gradients, and the
correction acts in the same units (as NVFlare's PTScaffoldHelper does it). With the robust round:
- screening and the geometric median: the control-variate deltas travel with the update (SiteResult.control_delta)
  and are screened with it (names, shapes, finite); a rejected or excluded site's delta is dropped with its update;
  the kept deltas are combined with the very weights the aggregator gave the sites' models this round (so a site the
  geometric median down-weights moves c as little as it moves the model), each first clipped to CONTROL_CLIP_FACTOR
  times the round's median delta norm (a site cannot move c much further than the typical site by sending a large
  delta), and c moves by
  (kept sites / sites asked) of that weighted mean, SCAFFOLD's |S|/N.
- DP: c_i+ is computed from x (the global model), c (the server's), c_i (the site's own, itself computed from earlier
  releases) and y_i, the model DP-SGD releases: post-processing, no extra epsilon. A user-level noise filter adds its
  noise after the site's round, so y_i is not what it releases and the delta would leak past it: SCAFFOLD refuses a
  round where such a filter releases the update (fedmed.site.site_round).
- HE: the encrypted layers get no control variate: a clear delta of those layers would show the server the head's
  move that HE hides. SCAFFOLD corrects the clear layers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

SERVER_OPTIMIZERS = ("none", "fedadam", "fedyogi", "fedavgm")
# A site's SCAFFOLD delta is clipped to this many times the round's median delta norm: a hostile delta 1000x the
# median moves c as much as one this many times it. Not lower: clipping an honest site breaks c = mean(c_i),
# SCAFFOLD's fixed point (on tests/test_algorithms.py's toy sites, whose curvatures differ 16x, a factor of 3 left the
# federation 0.02 from the optimum for good; 10 reached it within 1e-6).
CONTROL_CLIP_FACTOR = 10.0
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_weight(name: str, value) -> bool:
    """A parameter the server optimiser steps: floating point and not a BatchNorm running statistic."""
    return not name.endswith(STATISTICS_SUFFIXES) and np.issubdtype(np.asarray(value).dtype, np.floating)


@dataclass(frozen=True)
class ServerOptimizer:
    """FedOpt settings (Reddi et al. 2021). kind: "none" (the aggregate is the new global model), "fedadam",
    "fedyogi" or "fedavgm" (server SGD with momentum, Hsu et al. 2019: m = beta1 m + g, x - lr m; lr 1 and beta1 0
    is the aggregate itself, lr > 1 steps further along the sites' mean move). lr: the server learning rate eta;
    beta1 / beta2: moment decays (fedavgm: beta1 is its momentum, beta2 and tau unused); tau: adaptivity (the
    paper's epsilon), also v's starting value tau^2."""

    kind: str = "none"
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimiser must be one of {SERVER_OPTIMIZERS}, got {self.kind!r}")
        for name, value, low, high in (
            ("server_lr", self.lr, 0.0, math.inf),
            ("server_beta1", self.beta1, -1e-12, 1.0),
            ("server_beta2", self.beta2, -1e-12, 1.0),
            ("server_tau", self.tau, 0.0, math.inf),
        ):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and low < value < high):
                raise ValueError(f"{name} must be a number in ({max(low, 0)}, {high}), got {value!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


class FedOpt:
    """The server optimiser's state for one job: the moments m, v of the pseudo-gradient, per clear weight."""

    def __init__(self, settings: ServerOptimizer):
        if not settings.active:
            raise ValueError("FedOpt needs a server optimiser kind, not 'none'")
        self.settings = settings
        self.m: dict = {}
        self.v: dict = {}
        self.steps = 0

    def step(self, global_params: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict:
        """The new global model: aggregate's entries, with each clear weight replaced by the server optimiser's step
        from global_params along the pseudo-gradient global - aggregate. Entries of aggregate that global_params
        lacks (none in a screened round) and non-weights (BatchNorm statistics) are taken as aggregated."""
        s = self.settings
        out = dict(aggregate)
        for name, agg in aggregate.items():
            if name not in global_params or not is_weight(name, agg):
                continue
            x = np.asarray(global_params[name], dtype=np.float64)
            g = x - np.asarray(agg, dtype=np.float64)  # the pseudo-gradient
            if s.kind == "fedavgm":  # momentum on the raw move: no (1 - beta1) damping, no second moment
                self.m[name] = m = s.beta1 * self.m.get(name, 0.0) + g
                out[name] = (x - s.lr * m).astype(np.asarray(agg).dtype)
                continue
            m = s.beta1 * self.m.get(name, 0.0) + (1 - s.beta1) * g
            v = self.v.get(name, np.full_like(g, s.tau**2))
            g2 = g * g
            v = s.beta2 * v + (1 - s.beta2) * g2 if s.kind == "fedadam" else v - (1 - s.beta2) * g2 * np.sign(v - g2)
            self.m[name], self.v[name] = m, v
            out[name] = (x - s.lr * m / (np.sqrt(v) + s.tau)).astype(np.asarray(agg).dtype)
        self.steps += 1
        return out


@dataclass(frozen=True)
class FedAlgorithm:
    """The federated algorithm on top of the robust round, as one setting (fedmed.sim.inprocess.federate, the benchmarks):
    server_optimizer (FedOpt), proximal_mu (FedProx at the sites, 0 = off), scaffold (control variates)."""

    server_optimizer: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0
    scaffold: bool = False

    def __post_init__(self):
        ok = isinstance(self.proximal_mu, (int, float)) and not isinstance(self.proximal_mu, bool)
        if not (ok and math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu!r}")
        if not isinstance(self.scaffold, bool):
            raise ValueError(f"scaffold must be true or false, got {self.scaffold!r}")


# -- SCAFFOLD ------------------------------------------------------------------------------------------------------


def zeros_like(params: Mapping[str, np.ndarray]) -> dict:
    return {k: np.zeros(np.shape(v), dtype=np.float32) for k, v in params.items()}


def site_control_update(
    c_site: Mapping[str, np.ndarray],
    c_server: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    local_params: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
) -> tuple[dict, dict]:
    """SCAFFOLD option II at a site: (c_i+, delta_i = c_i+ - c_i) over the names of c_site, from the global model x
    the site trained from and its released model y_i after `steps` local steps at learning rate lr:
    c_i+ = c_i - c + (x - y_i) / (steps lr)."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0, got {steps} and {lr}")
    new, delta = {}, {}
    for name, ci in c_site.items():
        x = np.asarray(global_params[name], dtype=np.float32)
        y = np.asarray(local_params[name], dtype=np.float32)
        new[name] = (ci - c_server[name] + (x - y) / (steps * lr)).astype(np.float32)
        delta[name] = new[name] - ci
    return new, delta


def find_control_problem(delta, reference: Mapping[str, np.ndarray]) -> Optional[str]:
    """Why a site's control-variate delta cannot be combined against the server's control variate, or None."""
    if not isinstance(delta, Mapping):
        return f"control-variate delta must be a mapping of parameter names to arrays, got {type(delta).__name__}"
    missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
    if missing or extra:
        return f"control-variate delta names differ from the server's: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        try:
            arr = np.asarray(delta[name], dtype=np.float64)
        except (TypeError, ValueError):
            return f"control-variate delta {name!r} is not numeric"
        if arr.shape != np.shape(ref):
            return f"control-variate delta {name!r} has shape {arr.shape}, expected {np.shape(ref)}"
        if not np.isfinite(arr).all():
            return f"control-variate delta {name!r} is not finite"
    return None


def _norm(params: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values()))


class ScaffoldServer:
    """The server's control variate c for one job, over the names it is started with (the clear weights)."""

    def __init__(self, names_and_shapes: Mapping[str, tuple]):
        self.c = {k: np.zeros(s, dtype=np.float32) for k, s in names_and_shapes.items()}

    def update(self, deltas: Mapping[str, Mapping], weights: Mapping[str, float], num_sites: int) -> dict:
        """Fold the kept sites' deltas into c (module docstring): each clipped to CONTROL_CLIP_FACTOR x the median norm, combined
        with the aggregator's weights, scaled by kept / num_sites. Returns {"clipped": [...], "norm_cap": float}."""
        kept = [s for s, w in weights.items() if w > 0 and s in deltas]
        if not kept or num_sites < 1:
            return {"clipped": [], "norm_cap": None}
        norms = {s: _norm(deltas[s]) for s in kept}
        cap = CONTROL_CLIP_FACTOR * float(np.median(list(norms.values())))
        total = sum(weights[s] for s in kept)
        share = len(kept) / max(num_sites, len(kept))
        clipped = []
        for s in kept:
            scale = 1.0
            if norms[s] > cap > 0:
                scale, _ = cap / norms[s], clipped.append(s)
            factor = share * scale * weights[s] / total
            for name in self.c:
                self.c[name] = self.c[name] + np.float32(factor) * np.asarray(deltas[s][name], dtype=np.float32)
        return {"clipped": clipped, "norm_cap": cap}


# -- the local correction: what FedProx and SCAFFOLD add to a site's local steps -----------------------------------


class LocalCorrection:
    """Applied by fedmed.learning.training.run_epoch around each optimiser step of a site's round.

    before_step(): adds the FedProx gradient mu (w - w_global) to each trained parameter's gradient (plain training;
    under DP-SGD the same function runs from the DP optimiser's step hook, after clipping and noise: see
    dp_sgd_hook). after_step(): SCAFFOLD's w -= lr (c - c_i). Bound to the parameter tensors themselves, so the same
    object serves the plain module and Opacus' wrapper of it."""

    def __init__(
        self,
        model: torch.nn.Module,
        global_params: Mapping[str, np.ndarray],
        proximal_mu: float = 0.0,
        drift: Optional[Mapping[str, np.ndarray]] = None,
        lr: float = 0.0,
    ):
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        self.mu = float(proximal_mu)
        self.lr = float(lr)
        self.in_hook = False  # True under DP-SGD: the proximal gradient is added by the DP optimiser's hook
        named = dict(model.named_parameters())
        self._anchor = (
            [(p, torch.as_tensor(np.asarray(global_params[n]), dtype=p.dtype)) for n, p in named.items()]
            if self.mu > 0
            else []
        )
        self._drift = [
            (named[n], torch.as_tensor(np.asarray(d), dtype=named[n].dtype)) for n, d in (drift or {}).items()
        ]
        self.steps = 0

    def add_proximal(self) -> None:
        with torch.no_grad():
            for p, anchor in self._anchor:
                if p.requires_grad and p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=self.mu)

    def before_step(self) -> None:
        if not self.in_hook:
            self.add_proximal()

    def after_step(self) -> None:
        self.steps += 1
        if self._drift:
            with torch.no_grad():
                for p, d in self._drift:
                    if p.requires_grad:
                        p.sub_(d, alpha=self.lr)

    def dp_sgd_hook(self, optimizer) -> None:
        """Chain the proximal gradient after the DP optimiser's own step hook (Opacus' accountant): the hook runs in
        DPOptimizer.pre_step after clip_and_accumulate, add_noise and scale_grad, so p.grad is already the privatised
        gradient when the data-independent mu (w - w_global) is added (module docstring)."""
        self.in_hook = True
        earlier = optimizer.step_hook

        def hook(opt):
            if earlier is not None:
                earlier(opt)
            self.add_proximal()

        optimizer.step_hook = hook


def drift(c_server: Mapping[str, np.ndarray], c_site: Mapping[str, np.ndarray], names: Sequence[str]) -> dict:
    """c - c_i over names (the SCAFFOLD correction's direction)."""
    return {n: np.asarray(c_server[n], dtype=np.float32) - np.asarray(c_site[n], dtype=np.float32) for n in names}
