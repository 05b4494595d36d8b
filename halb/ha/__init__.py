"""halb.ha."""
