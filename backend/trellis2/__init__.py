"""Our re-implementation of the TRELLIS.2 networks and pipeline, loading the official checkpoint unchanged."""
