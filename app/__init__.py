"""MedMO Serve: an HTTP inference service for the MedMO medical vision-language model."""

__version__ = "0.1.0"
