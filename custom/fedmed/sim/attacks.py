"""Hostile-hospital simulation: what a compromised or broken site could send. Used by the robustness tests and
benchmarks, and switchable per site (fedmed_site.json "hostile") to rehearse a real deployment's defences.
Attacks act on the site's update (local - global) after honest local training, except label flipping, which
poisons the training itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fedmed.job.config_keys import check_keys
from fedmed.server.robust.geometric_median import NON_TRAINABLE_SUFFIXES

ATTACKS = ("sign_flip", "scale", "gaussian_noise", "label_flip", "nan", "little_is_enough")
# Attacks on what a site sends besides its weights (its claims, statistics, ciphertexts, metrics, or an earlier or
# another site's update). The red-team script plays them in-process (fedmed.sim.inprocess, apply_wire_attack); a
# site's rehearsal config ("hostile" in fedmed_site.json) takes only ATTACKS.
WIRE_ATTACKS = ("inflate_count", "bn_poison", "he_scale", "he_other_scale", "long_metric", "replay", "copy_site")
# Adaptive attackers that know the sign rule (fedmed.server.robust.sign_balance): ALIE / Min-Max inverse-std whose
# shift is sign-balanced (sign_balanced_move). Defined before COLLUDING_ATTACKS, which includes them.
BALANCED = ("alie_balanced", "min_max_balanced")
# Omniscient attacks from the robust-aggregation literature: every colluder knows the round's honest updates and
# all colluders send one common point (each with its own BatchNorm statistics from its own training). Played by
# fedmed.sim.inprocess after the honest sites have trained (craft_colluding).
COLLUDING_ATTACKS = ("alie", "min_max_unit", "min_max_std", "min_sum_unit", "min_sum_std", "ipm") + BALANCED


@dataclass(frozen=True)
class Attack:
    """Args:
    kind: one of ATTACKS.
    factor: sign_flip / scale multiply the update by -factor / factor; gaussian_noise uses factor x the update's
        RMS as noise std; little_is_enough shifts by factor (z) standard deviations (Baruch et al. 2019 use z ~ 1);
        alie / alie_balanced: z, where 0 means the paper's z for the federation's size (alie_z); ipm: epsilon.
    seed: noise seed.
    """

    kind: str
    factor: float = 1.0
    seed: int = 0

    def __post_init__(self):
        kinds = ATTACKS + WIRE_ATTACKS + COLLUDING_ATTACKS
        if self.kind not in kinds:
            raise ValueError(f"attack kind must be one of {kinds}, got {self.kind!r}")
        if not np.isfinite(self.factor) or self.factor < 0:
            raise ValueError(f"attack factor must be finite and >= 0, got {self.factor}")

    @property
    def poisons_labels(self) -> bool:
        return self.kind == "label_flip"

    @property
    def on_wire(self) -> bool:
        return self.kind in WIRE_ATTACKS

    @property
    def omniscient(self) -> bool:
        return self.kind in COLLUDING_ATTACKS


def parse_attack(raw: dict | None) -> Attack | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"hostile must be an object with 'kind' (one of {ATTACKS}), got {raw!r}")
    check_keys(raw, ("kind", "factor", "seed"), "hostile")
    if raw["kind"] not in ATTACKS:
        raise ValueError(f"hostile kind must be one of {ATTACKS} in a site config, got {raw['kind']!r}")
    return Attack(raw["kind"], float(raw.get("factor", 1.0)), int(raw.get("seed", 0)))


def apply_attack(
    local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], attack: Attack, round_num: int = 0
) -> dict:
    """Return the hostile version of a site's parameters. BatchNorm statistics pass through unchanged."""
    rng = np.random.default_rng([attack.seed, round_num])
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if (
            not np.issubdtype(v.dtype, np.floating)
            or k.endswith(NON_TRAINABLE_SUFFIXES)
            or attack.poisons_labels
            or attack.on_wire
            or attack.omniscient
        ):
            out[k] = v.copy()
            continue
        g = np.asarray(global_[k], np.float64)
        delta = v.astype(np.float64) - g
        if attack.kind == "sign_flip":
            delta = -attack.factor * delta
        elif attack.kind == "scale":
            delta = attack.factor * delta
        elif attack.kind == "gaussian_noise":
            rms = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            delta = delta + rng.normal(0.0, attack.factor * rms + 1e-12, delta.shape)
        elif attack.kind == "nan":
            delta = np.full_like(delta, np.nan)
        elif attack.kind == "little_is_enough":
            # One colluder's estimate of the benign spread: its own update's magnitude per coordinate. The shift
            # stays within the benign spread, against the benign direction, which distance filters struggle to see.
            delta = delta - attack.factor * np.abs(delta)
        out[k] = (g + delta).astype(v.dtype)
    return out


def alie_z(n_sites: int, n_hostile: int) -> float:
    """The z of "A little is enough" (Baruch, Baruch and Goldberg, NeurIPS 2019): s = floor(n/2 + 1) - f honest
    sites must lie beyond the shifted value, z = Phi^-1((n - s) / n). 0.84 for 2 of 5, 0.25 for 1 of 5."""
    from statistics import NormalDist

    if not 0 < n_hostile < n_sites:
        raise ValueError(f"need 0 < n_hostile < n_sites, got {n_hostile}, {n_sites}")
    s = math.floor(n_sites / 2 + 1) - n_hostile
    return float(NormalDist().inv_cdf((n_sites - s) / n_sites))


def _search_gamma(honest: np.ndarray, mean: np.ndarray, dev: np.ndarray, objective: str, point=None) -> float:
    """The largest gamma with mean - gamma * dev still inside the honest sites' own spread, by the authors' binary
    search (Shejwalkar and Houmansadr, "Manipulating the Byzantine", NDSS 2021): min_max keeps the largest distance
    to an honest update at most the largest honest pairwise distance; min_sum keeps the sum of squared distances
    at most the largest honest site's. Their search starts at gamma = 10 in their models' units; here it starts at
    the honest bound over |dev| (scale-free), and halves the step 30 times as theirs does to 1e-5. point: gamma ->
    the crafted move, when it is not mean - gamma * dev (the sign-balanced attack re-chooses its signs per gamma)."""
    point = point or (lambda gamma: mean - gamma * dev)
    sq = np.sum(honest * honest, axis=1)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2.0 * honest @ honest.T, 0.0)
    bound = float(np.sqrt(pair.max())) if objective == "min_max" else float(pair.sum(axis=1).max())

    def fits(gamma):
        d2 = np.sum((honest - point(gamma)) ** 2, axis=1)
        return (float(np.sqrt(d2.max())) if objective == "min_max" else float(d2.sum())) <= bound

    norm = float(np.linalg.norm(dev))
    if norm == 0:
        return 0.0
    gamma = step = (np.sqrt(bound) if objective == "min_sum" else bound) / norm
    good = 0.0
    for _ in range(30):
        if fits(gamma):
            good, gamma = gamma, gamma + step / 2
        else:
            gamma = gamma - step / 2
        step /= 2
    return good


def craft_colluding(
    honest: Sequence[Mapping[str, np.ndarray]], global_: Mapping[str, np.ndarray], attack: Attack, n_hostile: int
) -> dict:
    """The colluders' common trainable parameters (global + the crafted move), from the round's honest updates
    (floating-point, non-BatchNorm parameters; the caller keeps each colluder's own statistics). n_hostile: how
    many colluders the federation has (the paper's z depends on it).
    alie: mean - z * std per coordinate (Baruch et al. 2019). min_max_* / min_sum_*: mean - gamma * dev with dev
    the unit vector of the mean (unit) or the per-coordinate std (std, the authors' "inverse std" perturbation),
    gamma by _search_gamma. ipm: -epsilon * mean (Xie, Koyejo and Gupta, "Fall of Empires", UAI 2019).
    alie_balanced / min_max_balanced: the same shifts, sign-balanced against the sign rule (sign_balanced_move)."""
    if not attack.omniscient:
        raise ValueError(f"{attack.kind} is not a colluding attack; one of {COLLUDING_ATTACKS}")
    if len(honest) < 2:
        raise ValueError(f"a colluding attack needs the honest updates of 2 or more sites, got {len(honest)}")
    keys = [
        k
        for k in sorted(global_)
        if np.issubdtype(np.asarray(global_[k]).dtype, np.floating) and not k.endswith(NON_TRAINABLE_SUFFIXES)
    ]
    sizes = [np.asarray(global_[k]).size for k in keys]
    g = np.concatenate([np.asarray(global_[k], np.float64).reshape(-1) for k in keys])
    x = np.stack([np.concatenate([np.asarray(u[k], np.float64).reshape(-1) for k in keys]) - g for u in honest])
    mean, std = x.mean(axis=0), x.std(axis=0)
    kind = attack.kind
    if kind == "alie":
        z = attack.factor if attack.factor > 0 else alie_z(len(honest) + n_hostile, n_hostile)
        move = mean - z * std
    elif kind == "ipm":
        move = -attack.factor * mean
    elif kind in BALANCED:
        point = sign_balanced_move(x, g)
        if kind == "alie_balanced":
            move = point(attack.factor if attack.factor > 0 else alie_z(len(honest) + n_hostile, n_hostile))
        else:
            move = point(_search_gamma(x, mean, std, "min_max", point))
    else:
        objective, direction = kind.rsplit("_", 1)
        norm = float(np.linalg.norm(mean))
        dev = std if direction == "std" else (mean / norm if norm > 0 else mean)
        move = mean - _search_gamma(x, mean, dev, objective) * dev
    out, start = {}, 0
    for k, n in zip(keys, sizes):
        ref = np.asarray(global_[k])
        out[k] = (g[start : start + n] + move[start : start + n]).reshape(ref.shape).astype(ref.dtype)
        start += n
    return out


def _balance(move: np.ndarray, g: np.ndarray) -> tuple[int, int]:
    """(#coordinates up, #down) of g + move as sent (float32, as the server's sign rule compares them)."""
    sent, start = (g + move).astype(np.float32), g.astype(np.float32)
    return int(np.count_nonzero(sent > start)), int(np.count_nonzero(sent < start))


def sign_balanced_move(honest: np.ndarray, g: np.ndarray):
    """gamma -> mean - gamma * (s * std), the adaptive attacker's move: it knows the sign rule (whose statistic,
    (#up - #down) / #moved, the plain ALIE / Min-Max inverse-std shift betrays by lowering nearly every coordinate).
    s_i = sign(mean_i): every coordinate is pushed against the honest mean (the harm: the aggregate's progress
    undone), so the move goes up about as often as down; then, to match the median honest site's balance exactly
    (what the server compares against), s is flipped on the fewest coordinates that fix the count, those where the
    push undoes the least (smallest std_i * |mean_i|) first. honest: the honest moves (sites x coordinates, float64);
    g: the global model's trainable coordinates."""
    mean, std = honest.mean(axis=0), honest.std(axis=0)
    target = float(np.median([(np.sum(x > 0) - np.sum(x < 0)) / max(np.count_nonzero(x), 1) for x in honest]))
    oppose = np.where(mean >= 0, 1.0, -1.0)
    order = np.argsort(std * np.abs(mean), kind="stable")  # the cheapest coordinates to give up first

    def point(gamma: float) -> np.ndarray:
        s = oppose.copy()
        move = mean - gamma * std * s
        up, down = _balance(move, g)
        need = int(round((target * (up + down) - (up - down)) / 2))  # > 0: turn that many downs into ups
        # A flip turns mean_i - gamma std_i (down, mean_i > 0) into mean_i + gamma std_i (up), or the reverse.
        flippable = (move < 0) & (mean > 0) if need > 0 else (move > 0) & (mean < 0)
        chosen = order[flippable[order]][: abs(need)]
        s[chosen] = -s[chosen]
        return mean - gamma * std * s

    return point
