"""The HTTP surface: routes per concern, reading uploads, errors, and typed access to app state."""
