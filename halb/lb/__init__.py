"""halb.lb."""
