# The image KubeRay pods run (rayjob.yaml): Ray's CUDA image with mlray installed.
#   docker build -t REGISTRY/mlray:0.1.0 . && docker push REGISTRY/mlray:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/mlray
RUN pip install --no-cache-dir -e /home/ray/mlray
WORKDIR /home/ray/mlray
