"""rayssd's entry points: each module runs as `python -m jobs.<verb>` and behind `rayssd <verb>`."""
