"""rayssd's distributed side: Ray Data pipelines, batch inference and Ray Serve."""
