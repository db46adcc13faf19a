"""Tracking in MLflow: runs (`tracker`), registered models and aliases (`registry`), loading a
model by URI (`models`), the models-from-code pyfunc (`pyfunc`) and pictures (`pictures`)."""
