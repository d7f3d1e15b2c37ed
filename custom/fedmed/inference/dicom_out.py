"""Results as DICOM objects for the PACS, built with highdicom: a Structured Report per study (TID 1500 measurement
report: each finding's probability, its threshold and the decision; the model identity and card as the algorithm
identification; the not-for-clinical-use line and out-of-distribution flags) and the Grad-CAM overlay as a
Secondary Capture in the source study.

Findings have no standard codes that fit a research classifier's outputs, so they are coded in a private scheme
(designator 99FEDMED: DICOM reserves "99" prefixes for local schemes) with the finding name as the meaning.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Optional, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

SCHEME = "99FEDMED"
MANUFACTURER = "fedmed"
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9000
PROCEDURE = hd.sr.CodedConcept("AI-CLASSIFICATION", SCHEME, "fedmed AI image classification")
CLINICAL_USE = hd.sr.CodedConcept("CLINICAL-USE", SCHEME, "Clinical use")
NOT_FOR_CLINICAL_USE = hd.sr.CodedConcept("NOT-FOR-CLINICAL-USE", SCHEME, "Not for clinical use")
RESEARCH_ONLY = hd.sr.CodedConcept("RESEARCH-DECISION-SUPPORT", SCHEME, "Research and decision support only")
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("OUT-OF-DISTRIBUTION", SCHEME, "Unlike the training images")
MAX_LO = 64  # DICOM LO: code meanings, series descriptions


# Type 2 attributes highdicom copies from the source into the new object: present (maybe empty) in a valid image,
# but PACS exports and older files sometimes omit them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _complete_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of the source header with missing type 2 patient/study attributes present and empty (the input is
    not changed)."""
    header = copy.deepcopy(source)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def finding_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name.upper()[:16], SCHEME, name[:MAX_LO])


def threshold_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"THR-{name.upper()}"[:16], SCHEME, f"{name} decision threshold"[:MAX_LO])


@dataclass(frozen=True)
class StudyFindings:
    """What the SR says about one study (plain values, so it can be built and tested without a run).

    Args:
        probabilities: finding -> study probability.
        thresholds: finding -> threshold (multi-label); empty for a multi-class model.
        decided: the positive findings, or [the predicted class].
        model_name / model_version / model_file_sha256: the model identity (fedmed.inference.model_file).
        card_lines: the model card as text lines.
        clinical_use_warning: the not-for-clinical-use line, or None.
        out_of_distribution: SOP Instance UIDs of images flagged as unlike the training data.
        ood_note: how the flag was decided (score and threshold), for the text.
        unreliable: findings above their threshold on an out-of-distribution image: "Indeterminate", not "Present".
    """

    probabilities: dict
    thresholds: dict
    decided: Sequence[str]
    model_name: str
    model_version: str
    model_file_sha256: str
    card_lines: Sequence[str] = ()
    clinical_use_warning: Optional[str] = None
    out_of_distribution: Sequence[str] = field(default_factory=tuple)
    ood_note: Optional[str] = None
    unreliable: Sequence[str] = field(default_factory=tuple)


def _algorithm(f: StudyFindings) -> hd.sr.AlgorithmIdentification:
    params = [f"model: {f.model_name}", f"model file sha256: {f.model_file_sha256}", *f.card_lines]
    if f.clinical_use_warning:
        params.insert(0, f.clinical_use_warning)
    if f.ood_note:
        params.append(f.ood_note)
    return hd.sr.AlgorithmIdentification(
        name="fedmed DenseNet-121", version=f.model_version[:MAX_LO], parameters=params
    )


def structured_report(findings: StudyFindings, sources: Sequence[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report for one study: per finding its probability (DCM Probability unit 1), its
    threshold, and Present/Absent by the decision (Indeterminate for a finding decided on an out-of-distribution
    image); clinical use and out-of-distribution as qualitative evaluations.

    Args:
        sources: headers of the study's images the model read (the SR's evidence; same patient and study).
    """
    if not sources:
        raise ValueError("a structured report needs at least one source image of the study")
    sources = [_complete_header(s) for s in sources]
    algorithm = _algorithm(findings)
    measurements, evaluations = [], []
    for name, p in findings.probabilities.items():
        measurements.append(
            hd.sr.Measurement(
                name=finding_code(name), value=float(p), unit=codes.UCUM.NoUnits, derivation=codes.DCM.Probability
            )
        )
        if name in findings.thresholds:
            measurements.append(
                hd.sr.Measurement(
                    name=threshold_code(name), value=float(findings.thresholds[name]), unit=codes.UCUM.NoUnits
                )
            )
        value = (
            codes.SCT.Indeterminate
            if name in findings.unreliable
            else codes.SCT.Present
            if name in findings.decided
            else codes.SCT.Absent
        )
        evaluations.append(hd.sr.QualitativeEvaluation(name=finding_code(name), value=value))
    evaluations.append(
        hd.sr.QualitativeEvaluation(
            name=CLINICAL_USE, value=NOT_FOR_CLINICAL_USE if findings.clinical_use_warning else RESEARCH_ONLY
        )
    )
    evaluations.append(
        hd.sr.QualitativeEvaluation(
            name=OUT_OF_DISTRIBUTION, value=codes.SCT.Present if findings.out_of_distribution else codes.SCT.Absent
        )
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="fedmed study findings"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="fedmed", model_name=findings.model_name[:MAX_LO]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=_series_description("fedmed AI findings", findings.clinical_use_warning),
    )
    return sr


def _series_description(what: str, warning: Optional[str]) -> str:
    return (f"{what} - NOT FOR CLINICAL USE" if warning else f"{what} (not for primary diagnosis)")[:MAX_LO]


def secondary_capture(
    rgb: np.ndarray,
    source: pydicom.Dataset,
    description: str,
    clinical_use_warning: Optional[str] = None,
    out_of_distribution: bool = False,
    burned_in: bool = False,
) -> hd.sc.SCImage:
    """The Grad-CAM overlay as a Secondary Capture in the source's study (same patient, a new series), referring
    to the source image, marked derived, with what it shows (and the not-for-clinical-use line) in its
    DerivationDescription and SeriesDescription.

    Args:
        rgb: (rows, cols, 3) uint8 overlay.
        source: the source image's header.
        description: what the overlay shows, e.g. "fedmed Grad-CAM Effusion p=0.81 (threshold 0.40)".
        out_of_distribution: the source image was flagged as unlike the training images: said in the
            SeriesDescription (what a PACS viewer lists) and ImageComments.
        burned_in: text was stamped into the pixels (banners; never patient data): BurnedInAnnotation YES.
    """
    source = _complete_header(source)
    orientation = tuple(str(v) for v in (getattr(source, "PatientOrientation", None) or ()))
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # the overlay keeps the source's rows and columns (resized), so its orientation is the source's
        patient_orientation=orientation if known else ("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if not known:
        # highdicom wants an orientation; PatientOrientation is type 2 (may be empty) and guessing one would be
        # worse than saying nothing when the source does not say
        sc.PatientOrientation = ""
    now = dt.datetime.now(dt.timezone.utc)
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    what = "fedmed Grad-CAM - OUT OF DISTRIBUTION" if out_of_distribution else "fedmed Grad-CAM overlay"
    sc.SeriesDescription = _series_description(what, clinical_use_warning)
    if out_of_distribution:
        sc.ImageComments = "OUT OF DISTRIBUTION: the source image is unlike the model's calibration images; unreliable"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"{clinical_use_warning}. {description}" if clinical_use_warning else description)[
        :1024
    ]
    # banners (fedmed.inference.predict.stamp_banners: not for clinical use, out of distribution, heatmap flat) are
    # text in the pixels; never patient data
    sc.BurnedInAnnotation = "YES" if burned_in or clinical_use_warning else "NO"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def _texts(items) -> list:
    out = []
    for item in items or ():
        if getattr(item, "ValueType", "") == "TEXT":
            out.append(str(item.TextValue))
        out.extend(_texts(getattr(item, "ContentSequence", None)))
    return out


def read_structured_report(sr: pydicom.Dataset) -> dict:
    """What a fedmed SR says, read back with highdicom: probabilities, thresholds, each finding's and the clinical
    use / out-of-distribution evaluations (by code meaning), and the algorithm's text parameters."""
    parsed = sr if isinstance(sr, hd.sr.Comprehensive3DSR) else hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError(f"expected one fedmed measurement group in the SR, found {len(groups)}")
    probabilities, thresholds = {}, {}
    for m in groups[0].get_measurements():
        if m.name.value.startswith("THR-"):
            thresholds[m.name.meaning.removesuffix(" decision threshold")] = float(m.value)
        else:
            probabilities[m.name.meaning] = float(m.value)
    evaluations = {q.name.meaning: q.value.meaning for q in groups[0].get_qualitative_evaluations()}
    return {
        "probabilities": probabilities,
        "thresholds": thresholds,
        "evaluations": evaluations,
        "texts": list(dict.fromkeys(_texts(parsed.ContentSequence))),
    }
