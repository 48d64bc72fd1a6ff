"""Storm and scheduler tests."""
