"""rayssd's Ray side, one subpackage per stage: `data`, `train`, `label`, `serve`, `track`,
and `common` for what they all share. A stage imports `data`, `track` and `common`, never
another stage's internals."""
