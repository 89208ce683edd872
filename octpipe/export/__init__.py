"""Exporters: anomaly maps to NIfTI, DICOM, PNG overlays and reports."""
