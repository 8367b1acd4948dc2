# The two commands of the README: `make run` and `make test`. Both bootstrap .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: venv run test clean-venv stack-up stack-down stack-status

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel on disk; any looser spec pulls a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# aisfx pins ancient numpy/librosa; its code runs on current ones.
	$(BIN)/python -m pip install --quiet --no-deps "aisfx==0.1.2"
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/python src/synthesize.py
	$(BIN)/python src/prepare.py

test: venv
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)

stack-up: venv
	PYTHON=$(BIN)/python deploy/stack.sh up
stack-down:
	PYTHON=$(BIN)/python deploy/stack.sh down
stack-status:
	PYTHON=$(BIN)/python deploy/stack.sh status
