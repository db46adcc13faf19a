"""Serving on Ray Serve: the ingress and detector deployments (`deployments`), their settings,
request checks and decoding (`requests`), the request coalescer (`coalesce`), statistics
(`stats`) and the application builder for `serve run` / KubeRay (`app`)."""
