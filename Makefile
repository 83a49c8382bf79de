# Two commands for a fresh machine (README): `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install install-dev clean gpu wheelhouse compat gpu-kit compat-bare

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Stamp files: reinstall only when the packaging changes.
$(VENV)/.installed: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,dali]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The demo also draws its pictures: matplotlib comes with the [viz] extra.
$(VENV)/.installed-viz: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e '.[viz]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed-viz
	$(BIN)/ccs-fast demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests bench -q --benchmark-disable $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache

# --- GPU figures (README "Taking the GPU figures") -------------------------------------
# `make gpu` runs on the GPU machine with that machine's own Python and torch: it never
# creates a venv and never installs torch. `make wheelhouse` runs where a package registry
# is reachable and fills wheelhouse/ with what the GPU machines lack.
GPU_PYTHON ?= python3
GPU_ARGS   ?=
WHEELHOUSE ?= wheelhouse
WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu:
	$(GPU_PYTHON) -m bench.gpu $(GPU_ARGS)

# DALI with its nvidia-* libraries, PyAV, OpenCV with the contrib modules (TV-L1), and
# setuptools for `pip install -e .` on a Python without it. Wheels of packages a machine
# already has (numpy, packaging, ...) come along but `make gpu` does not install them.
wheelhouse:
	$(PYTHON) -m pip download --dest $(WHEELHOUSE) $(WHEEL_PLATFORM) \
		nvidia-dali-cuda130 av opencv-contrib-python-headless setuptools
	@$(PYTHON) -c "import pathlib; w = list(pathlib.Path('$(WHEELHOUSE)').glob('*.whl')); \
		print(f'{len(w)} wheels, {sum(p.stat().st_size for p in w) / 2**20:.0f} MiB in $(WHEELHOUSE)/')"

# The kit for the bare GPU machines (README, "Taking the GPU figures"): the wheels their image
# lacks (PyAV; DALI with the dependencies it has and the image lacks; opencv-contrib, for
# cv2.optflow), cut into parts of at most KIT_PART_MIB with a manifest of sizes and SHA-256
# sums, in KIT_DIR (git-ignored). `python -m bench.gpu --kit KIT_DIR` installs what arrived.
KIT_DIR      ?= .device_wheels
KIT_DOWNLOAD ?= runs/gpu-kit-download
KIT_PART_MIB ?= 60

gpu-kit:
	rm -rf $(KIT_DOWNLOAD)
	$(PYTHON) -m pip download --quiet --dest $(KIT_DOWNLOAD) $(WHEEL_PLATFORM) av nvidia-dali-cuda130
	$(PYTHON) -m pip download --quiet --no-deps --dest $(KIT_DOWNLOAD) $(WHEEL_PLATFORM) opencv-contrib-python-headless
	$(PYTHON) -m bench.kit make $(KIT_DOWNLOAD) --out $(KIT_DIR) --part-mib $(KIT_PART_MIB)

# --- The GPU machines' older pair on CPU: Python 3.12, torch 2.11, triton 3.6 -----------
# Triton 3.6's interpreter calls int() on one-element arrays, an error from numpy 2.4 on;
# torch 2.11 requires setuptools < 82 (so the GPU machines build the editable install with it).
COMPAT_PYTHON ?= python3.12
COMPAT_VENV   ?= .venv-compat
COMPAT_PINS   := 'torch==2.11.*' 'triton==3.6.*' 'torchvision==0.26.*' 'numpy<2.4' 'setuptools<82'

$(COMPAT_VENV)/.installed: setup.py pyproject.toml
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --upgrade pip wheel
	printf '%s\n' $(COMPAT_PINS) > $(COMPAT_VENV)/constraints.txt
	$(COMPAT_VENV)/bin/pip install --quiet -c $(COMPAT_VENV)/constraints.txt $(COMPAT_PINS)
	$(COMPAT_VENV)/bin/pip install --quiet -c $(COMPAT_VENV)/constraints.txt -e '.[dev]'
	touch $@

# Every check runs; the target fails at the end if any of them failed.
compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c 'import sys, torch, triton, numpy; print("compat:", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'
	@failed=""; \
	$(COMPAT_VENV)/bin/python -m pytest -q --benchmark-disable tests/kernels \
		tests/ccs_fast/test_losses.py tests/ccs_fast/test_connection.py tests/dataloader/test_tvl1.py \
		tests/dataloader/test_torch_loader.py || failed="$$failed kernel-tests"; \
	$(COMPAT_VENV)/bin/python -m bench.aot --check || failed="$$failed aot"; \
	$(COMPAT_VENV)/bin/python -m bench.gpu --dry-run || failed="$$failed gpu-dry-run"; \
	if [ -n "$$failed" ]; then echo "compat: failed:$$failed"; exit 1; fi; echo "compat: all green"

# --- The bare GPU image on CPU: exactly its packages, the checkout --no-deps ------------
# No PyAV, no DALI, no opencv-contrib (numpy < 2.4 only for Triton 3.6's interpreter on CPU);
# hypothesis, pytest-timeout (the suite uses them) and six (DALI from the kit does) are in the
# image's package list too.
# Runs the dry run of `make gpu` and the tests that need neither PyAV nor DALI; `make test`
# checks the same in its own venv with bench/bare_image hiding what the image lacks.
BARE_PYTHON ?= python3.12
BARE_VENV   ?= .venv-bare
BARE_PINS   := 'torch==2.11.*' 'triton==3.6.*' 'torchvision==0.26.*' timm opencv-python-headless 'numpy<2.4' \
	pytest pytest-benchmark pytest-timeout hypothesis matplotlib tensorboard tqdm pyyaml six 'setuptools<82' wheel
BARE_TESTS  := tests/kernels/test_cross_attention.py tests/kernels/test_triplet.py tests/kernels/test_center.py \
	tests/kernels/test_determinism.py tests/kernels/test_ops.py tests/ccs_fast/test_losses.py \
	tests/ccs_fast/test_connection.py tests/dataloader/test_tvl1.py tests/bench/test_gpu.py tests/bench/test_kit.py

$(BARE_VENV)/.installed: setup.py pyproject.toml Makefile
	$(BARE_PYTHON) -m venv $(BARE_VENV)
	$(BARE_VENV)/bin/pip install --quiet --upgrade pip
	$(BARE_VENV)/bin/pip install --quiet $(BARE_PINS)
	$(BARE_VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

compat-bare: $(BARE_VENV)/.installed
	$(BARE_VENV)/bin/python -c 'import sys, importlib.util as u, cv2, torch, triton, numpy; \
		print("compat-bare:", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, \
		      "numpy", numpy.__version__, "cv2", cv2.__version__); \
		extra = [n for n in ("av", "nvidia.dali") if u.find_spec(n.split(".")[0]) and u.find_spec(n)]; \
		extra += ["cv2.optflow"] * hasattr(cv2, "optflow"); \
		sys.exit(f"compat-bare: {extra} installed; the bare image has none of them" if extra else 0)'
	@failed=""; \
	$(BARE_VENV)/bin/python -m pytest -q --benchmark-disable -p no:cacheprovider $(BARE_TESTS) || failed="$$failed tests"; \
	$(BARE_VENV)/bin/python -m bench.gpu --dry-run || failed="$$failed gpu-dry-run"; \
	if [ -n "$$failed" ]; then echo "compat-bare: failed:$$failed"; exit 1; fi; echo "compat-bare: all green"
