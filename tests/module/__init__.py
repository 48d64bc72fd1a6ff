"""Tests of the module layer (tdxcore.module)."""
