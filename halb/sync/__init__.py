"""halb.sync."""
