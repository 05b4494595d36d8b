"""halb.agent: the per-node agent process that ties election, dataplane and sync."""
