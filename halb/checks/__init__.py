"""halb.checks."""
