"""Build-time extensions of the documentation site (not part of the library)."""
