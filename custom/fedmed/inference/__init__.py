"""Clinician inference on DICOM studies: study discovery and frontal-view selection, the model file (hash, round,
thresholds), batched prediction with Grad-CAM overlays, pseudonymised logging, and the MONAI Bundle export.
No NVFlare imports."""
