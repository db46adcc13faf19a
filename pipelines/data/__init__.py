"""Data: sources → checked rows → training samples or network inputs.

`sources` (COCO, folders, locations), `voc`, `validation` (the ingest report), `datasets`
(one row per image as a Ray Dataset), `builtin` (the built-in scenes), `samples` (decode,
augment, resize, match on CPU workers) and `prepare` (matched samples written once).
"""
