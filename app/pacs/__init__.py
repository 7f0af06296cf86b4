"""The PACS, reached over DICOMweb: images fetched by UID (WADO-RS), answers stored back (STOW-RS)."""
