"""rayssd's numerics: a plain PyTorch SSD (no Ray, no MLflow, no files or argv)."""
