"""Tests of the tools layer (bench plots, baseline check)."""
