"""Other encodings of a result than JSON: DICOM Structured Reports."""
