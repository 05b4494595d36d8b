"""halb.testing."""
