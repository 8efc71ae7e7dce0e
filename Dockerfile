# The image KubeRay pods run (rayjob.yaml): Ray's CUDA image with mlray installed.
#   docker build -t REGISTRY/mlray:0.1.0 . && docker push REGISTRY/mlray:0.1.0
# torch/torchvision come at the versions constraints.txt pins, as their CUDA 12.8
# build from PyTorch's index: it runs on NVIDIA drivers >= 525 (CUDA 12 minor-version
# compatibility), where PyPI's default build (CUDA 13) needs >= 580 and fails at NCCL
# init on older nodes. Another build: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# (keep cluster.yaml's setup_commands on the same index).
FROM rayproject/ray:2.60.0-py311-gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
COPY --chown=ray:users . /home/ray/mlray
RUN pip install --no-cache-dir -c /home/ray/mlray/constraints.txt --extra-index-url ${TORCH_INDEX} -e /home/ray/mlray
WORKDIR /home/ray/mlray
