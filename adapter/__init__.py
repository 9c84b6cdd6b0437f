"""Ingest, queue, service and command line. Depends on pipeline, dicom_io and config."""
