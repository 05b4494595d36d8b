"""Flow state as the dataplanes and FlowSync share it: packed flow records."""
