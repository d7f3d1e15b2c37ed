"""The model card a model file carries in ``meta["model_card"]``: what the weights are for and what was actually done
to make them (task, hospitals whose updates were aggregated, rounds, whether their data was synthetic, each site's DP
epsilon, HE, aggregation, intended use). Pure: the Controller, the in-process writers and inference use it.

The card is built from what the run did (ModelCardBuilder.add_round sees each aggregated round's site results), never
from what a job config claims. A model trained on synthetic data, or whose card cannot say, carries a
not-for-clinical-use line (clinical_use_warning) that every inference output repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

META_MODEL_CARD = "model_card"
SYNTHETIC_MANUFACTURER = "fedmed-synthetic"  # the Manufacturer fedmed.data.synthetic writes into every image
INTENDED_USE = (
    "Research and decision support for trained readers only; not for primary diagnosis. Not a medical "
    "device; outputs are probabilities for a reader to weigh, never a diagnosis."
)
CARD_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """Args:
    task: fedmed.job.tasks name.
    hospitals: the sites whose updates were aggregated into these weights (in any round).
    rounds: aggregated rounds behind these weights.
    synthetic_sites / real_sites / unknown_sites: hospitals that reported their training data synthetic, real, or
        did not say.
    dp_epsilon: site -> epsilon spent in this run (its accountant's, as reported), None where the site trained
        without DP-SGD.
    he_layers: the layers combined CKKS-encrypted (empty: no HE).
    aggregation: fedmed.server.aggregation name.
    trained_by: how the weights were made ("NVFlare federation", "in-process federation", "central pretraining").
    intended_use: what the outputs may be used for.
    """

    task: str
    hospitals: tuple
    rounds: int
    synthetic_sites: tuple
    real_sites: tuple
    unknown_sites: tuple
    dp_epsilon: Mapping = field(default_factory=dict)
    he_layers: tuple = ()
    aggregation: str = ""
    trained_by: str = ""
    intended_use: str = INTENDED_USE

    @property
    def synthetic_data(self) -> Optional[bool]:
        """True when any hospital trained on synthetic data; None when any did not say; False otherwise."""
        if self.synthetic_sites:
            return True
        return None if self.unknown_sites or not self.hospitals else False

    def to_meta(self) -> dict:
        return {
            "version": CARD_VERSION,
            "task": self.task,
            "hospitals": list(self.hospitals),
            "rounds": self.rounds,
            "synthetic_data": self.synthetic_data,
            "synthetic_sites": list(self.synthetic_sites),
            "real_sites": list(self.real_sites),
            "unknown_sites": list(self.unknown_sites),
            "dp_epsilon": dict(self.dp_epsilon),
            "he_layers": list(self.he_layers),
            "aggregation": self.aggregation,
            "trained_by": self.trained_by,
            "intended_use": self.intended_use,
        }

    @classmethod
    def from_meta(cls, raw: Mapping, source: str = "model file") -> "ModelCard":
        """Raises ValueError naming the field when the card is malformed (a model file is untrusted input)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: model_card must be a mapping, got {type(raw).__name__}")

        def names(key):
            v = raw.get(key, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{source}: model_card {key} must be a list of site names, got {v!r}")
            return tuple(v)

        rounds = raw.get("rounds", 0)
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"{source}: model_card rounds must be an integer >= 0, got {rounds!r}")
        eps = raw.get("dp_epsilon", {})
        if not isinstance(eps, Mapping) or not all(v is None or isinstance(v, (int, float)) for v in eps.values()):
            raise ValueError(f"{source}: model_card dp_epsilon must map sites to a number or null, got {eps!r}")
        return cls(
            task=str(raw.get("task", "")),
            hospitals=names("hospitals"),
            rounds=rounds,
            synthetic_sites=names("synthetic_sites"),
            real_sites=names("real_sites"),
            unknown_sites=names("unknown_sites"),
            dp_epsilon={str(k): v for k, v in eps.items()},
            he_layers=names("he_layers"),
            aggregation=str(raw.get("aggregation", "")),
            trained_by=str(raw.get("trained_by", "")),
            intended_use=str(raw.get("intended_use", INTENDED_USE)),
        )

    def lines(self) -> list:
        """The card as short human-readable lines (console, reports, bundle README, the SR's text)."""

        def dp(site):
            e = self.dp_epsilon.get(site)
            return f"{site} epsilon {e:.2f}" if isinstance(e, (int, float)) else f"{site} no DP"

        data = "synthetic (" + ", ".join(self.synthetic_sites) + ")" if self.synthetic_sites else ""
        if self.real_sites:
            data += ("; " if data else "") + "real (" + ", ".join(self.real_sites) + ")"
        if self.unknown_sites:
            data += ("; " if data else "") + "not reported (" + ", ".join(self.unknown_sites) + ")"
        return [
            f"task: {self.task}",
            f"trained by: {self.trained_by or 'unknown'}, {self.rounds} aggregated round(s), aggregation "
            f"{self.aggregation or 'unknown'}",
            f"training hospitals: {', '.join(self.hospitals) or 'none recorded'}",
            f"training data: {data or 'unknown'}",
            "differential privacy: " + (", ".join(dp(s) for s in self.hospitals) or "unknown"),
            "homomorphic encryption: " + (", ".join(self.he_layers) if self.he_layers else "off"),
            f"intended use: {self.intended_use}",
        ]


def clinical_use_warning(card: Optional[ModelCard]) -> Optional[str]:
    """The not-for-clinical-use line every inference output carries, or None for a card of real data only."""
    if card is None:
        return (
            "NOT FOR CLINICAL USE: this model file carries no model card, so what it was trained on is unknown; "
            "results are for testing only"
        )
    if card.synthetic_sites:
        return (
            f"NOT FOR CLINICAL USE: trained on synthetic data ({', '.join(card.synthetic_sites)}); results mean "
            "nothing for a real patient"
        )
    if card.synthetic_data is None:
        return (
            "NOT FOR CLINICAL USE: the model card cannot say whether the training data was real "
            f"(not reported by: {', '.join(card.unknown_sites) or 'any hospital'}); results are for testing only"
        )
    return None


def card_from_meta(meta: Mapping, source: str = "model file") -> Optional[ModelCard]:
    raw = meta.get(META_MODEL_CARD)
    return None if raw is None else ModelCard.from_meta(raw, source)


@dataclass
class ModelCardBuilder:
    """Accumulates a card over a run's aggregated rounds, from the site results the server actually received."""

    task: str
    aggregation: str
    trained_by: str
    he_layers: Sequence[str] = ()
    hospitals: dict = field(default_factory=dict)  # site -> synthetic flag (True/False/None), insertion ordered
    epsilon: dict = field(default_factory=dict)  # site -> last reported epsilon or None
    rounds: int = 0

    def continue_from(self, card: Optional[ModelCard]) -> "ModelCardBuilder":
        """Carry on the card of a resumed run's global model (its hospitals, epsilons and rounds so far)."""
        if card is not None:
            for site in card.hospitals:
                self.hospitals[site] = (
                    True if site in card.synthetic_sites else False if site in card.real_sites else None
                )
            self.epsilon.update({s: e for s, e in card.dp_epsilon.items() if s in self.hospitals})
            self.rounds = card.rounds
        return self

    def add_round(self, aggregated_sites: Sequence[str], site_results: Sequence) -> None:
        """site_results: fedmed.server.rounds.SiteResult (or anything with .site, .privacy and .data_synthetic)."""
        by_site = {r.site: r for r in site_results}
        for site in aggregated_sites:
            r = by_site.get(site)
            flag = getattr(r, "data_synthetic", None) if r is not None else None
            known = self.hospitals.get(site)
            # Once a site has said synthetic it stays synthetic: these weights have seen that data.
            self.hospitals[site] = True if True in (known, flag) else (flag if flag is not None else known)
            eps = (getattr(r, "privacy", None) or {}).get("epsilon") if r is not None else None
            if isinstance(eps, (int, float)):
                self.epsilon[site] = float(eps)
            else:
                self.epsilon.setdefault(site, None)
        self.rounds += 1

    def card(self) -> ModelCard:
        sites = tuple(self.hospitals)
        return ModelCard(
            task=self.task,
            hospitals=sites,
            rounds=self.rounds,
            synthetic_sites=tuple(s for s in sites if self.hospitals[s] is True),
            real_sites=tuple(s for s in sites if self.hospitals[s] is False),
            unknown_sites=tuple(s for s in sites if self.hospitals[s] is None),
            dp_epsilon={s: self.epsilon.get(s) for s in sites},
            he_layers=tuple(self.he_layers or ()),
            aggregation=self.aggregation,
            trained_by=self.trained_by,
        )


def is_synthetic_dicom(path) -> Optional[bool]:
    """Whether a DICOM file was written by fedmed's synthetic generator (its Manufacturer); None when unreadable or
    not DICOM (e.g. PNG)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
        return None
    return str(getattr(ds, "Manufacturer", "") or "") == SYNTHETIC_MANUFACTURER


def data_is_synthetic(paths: Sequence, declared: bool = False) -> Optional[bool]:
    """A site's answer for the card: True when its config declares rehearsal data or any of the first few images
    was written by fedmed's generator; False otherwise (the site does not declare it and its images, DICOM from
    elsewhere or PNG, which the generator never writes, are not the generator's); None with no images to look at."""
    if declared:
        return True
    sample = list(paths)[:8]
    if any(is_synthetic_dicom(p) is True for p in sample):
        return True
    return False if sample else None
