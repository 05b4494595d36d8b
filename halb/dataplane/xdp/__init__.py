"""halb.dataplane.xdp."""
