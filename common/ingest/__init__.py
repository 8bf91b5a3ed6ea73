"""Readers that turn a site's raw files (DICOM, NIfTI, slice images) into scans."""
