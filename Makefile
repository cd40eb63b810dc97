# rtl: set-up and test entry points. `make test` does everything on a fresh machine:
# creates .venv (Python 3.11), installs torch 2.14.1 + torchvision 0.29.1 and the test tools, builds and
# installs rtl editable (C++ CPU extension; the CUDA extension too when CUDA_HOME holds nvcc), runs pytest.
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
PYTEST_ARGS ?= -q -ra

.PHONY: test install venv bench info clean demo sanitize lint format espeak speech

# torch is pinned here (the build this machine's disk holds); every other dependency is declared in pyproject.toml
# and installed with the package (extras method, test and lint).
$(VENV)/.deps-installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q "setuptools>=64" wheel ninja
	touch $@

venv: $(VENV)/.deps-installed

# The extensions are built in place by setup.py (ninja rebuilds only what changed); pip then registers the
# package as editable without building again.
install: venv
	$(VPY) setup.py -q build_ext --inplace
	RTL_BUILD_CPU=0 RTL_BUILD_CUDA=0 $(VPY) -m pip install -q --no-build-isolation -e ".[method,test,lint]"

info: install
	$(VPY) -m rtl_kernels.info

# Linters (configured in pyproject.toml and .clang-format): `make lint` checks, `make format` rewrites.
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc')
PY_SOURCES = rtl rtl_kernels bench tests tools setup.py
lint: install
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: install
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# pytest exits 5 when it collected no test: that is not a failure of the package.
test: install
	$(VPY) -m rtl_kernels.info
	$(VPY) -m pytest tests $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The sanitizer lane: the CPU extension rebuilt with AddressSanitizer + UndefinedBehaviorSanitizer (in
# build/sanitize, the regular build untouched), then the rtl_kernels and property-based tests against it.
sanitize: install
	PY=$(abspath $(VPY)) tools/sanitizer_lane.sh

# The README's first command: a real Routing-the-Lottery run on the default experiment with the quick budget.
# The CUDA extension is not needed for it (CPU run), so it is not compiled here unless asked for
# (RTL_BUILD_CUDA=1 make demo); a finished demo is resumed (nothing recomputed) and its report rebuilt.
DEMO_DIR ?= runs/demo
demo: export RTL_BUILD_CUDA ?= 0
demo: install
	@if [ -f $(DEMO_DIR)/config.json ]; then \
		$(VPY) -m rtl run digits-classes --quick --resume $(DEMO_DIR); \
	else \
		$(VPY) -m rtl run digits-classes --quick --out $(DEMO_DIR); \
	fi

# The speech experiment's clean speech comes from Debian's espeak-ng: installed here when it is missing and apt-get
# can run; otherwise rtl uses its numpy formant synthesiser and the report names the source.
espeak:
	@command -v espeak-ng >/dev/null || { \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get install -y -q espeak-ng; \
		elif command -v sudo >/dev/null; then sudo apt-get install -y -q espeak-ng; \
		else echo "espeak-ng is missing and cannot be installed here: the speech run uses the formant synthesiser"; fi; }

# The speech experiment (paper Table 3) with the quick budget over three seeds; an interrupted run is resumed.
SPEECH_DIR ?= runs/speech-environments
speech: export RTL_BUILD_CUDA ?= 0
speech: install espeak
	@if [ -d $(SPEECH_DIR) ]; then \
		$(VPY) -m rtl run speech-environments --quick --seeds 0,1,2 --resume $(SPEECH_DIR); \
	else \
		$(VPY) -m rtl run speech-environments --quick --seeds 0,1,2 --out $(SPEECH_DIR); \
	fi

# The benchmarks run from the checkout (they are not installed with the package): python -m bench TARGET [ARGS].
bench: install
	$(VPY) -m bench linear

clean:
	rm -rf build rtl_kernels/*.so *.egg-info
