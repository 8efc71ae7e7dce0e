# Two commands do all the set-up on a fresh machine with Python >= 3.11 and pip:
#   make demo   # build a real multi-label data set, train, evaluate, tag (embedded local Ray, CPU)
#   make test   # the test suite (real Ray, real S3 server on loopback, real images)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlray-installed

.PHONY: test demo bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/mlray demo --config jobs/configs/demo.yaml --out out/demo

bench: $(STAMP)
	test -d /usr/share/openclipart/svg || sudo apt-get install -y openclipart-png openclipart-svg || apt-get install -y openclipart-png openclipart-svg
	RAY_AUTH_MODE=disabled $(PY) -m benchmarks.run

# no $(STAMP): a GPU machine may be offline; the check runs with what is installed
gpu-check:
	RAY_AUTH_MODE=disabled $(PY) -m benchmarks.gpu_check --out out/gpu_check

clean:
	rm -rf $(VENV) out
