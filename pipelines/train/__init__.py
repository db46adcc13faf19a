"""Training on Ray Train: the worker loop (`loop`) and the live progress board (`progress`)."""
