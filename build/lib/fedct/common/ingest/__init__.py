"""Readers that turn a site's raw files (DICOM, NIfTI, slice images) into scans."""

FORMATS = ("auto", "dicom", "nifti", "png")  # what --format takes; "auto" picks by content
