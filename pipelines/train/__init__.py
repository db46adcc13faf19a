"""Training on Ray Train: `launch` (plan before Ray starts, then run), `datasets` (training
samples and val inputs from a source or prepared samples), `loop` (the worker loop),
`evaluation` (val mAP inside training) and `progress` (the live progress board)."""
