"""Datasets in their official formats, DICOM reading, transforms, synthetic data."""
