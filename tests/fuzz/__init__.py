"""Fuzz targets, their committed corpora and the tests that replay them (docs/hardening.rst)."""
