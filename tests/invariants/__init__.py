"""Tests of the model invariants (``tdxcore.invariants``)."""
