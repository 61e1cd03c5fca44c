# llmc: `make demo` sets up and runs the main job; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLMC := $(VENV)/bin/llmc
STAMP := $(VENV)/.llmc-installed
ENGINE := build/stories260K.engine
QUANT := build/stories260K-w4a16
QENGINE := build/stories260K-w4a16.engine

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned to the CPU build first, so nothing later pulls a CUDA build. triton (the gpu extra's
# kernel compiler) is installed for the tests, which run its kernels on the CPU under TRITON_INTERPRET=1.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,serve,onnx]' 'triton>=3.2'
	touch $@

test: setup
	$(PY) -P -m pytest -q

demo: setup
	$(LLMC) inspect golden/stories260K
	$(LLMC) compile golden/stories260K -o $(ENGINE) --force
	$(LLMC) generate $(ENGINE) --prompt "Once upon a time" --prompt "Tom and his dog" --max-tokens 120
	$(LLMC) quantize golden/stories260K -o $(QUANT) --profile int4-gptq --group-size 32 --calib-samples 64 --force
	$(LLMC) bench quality $(QUANT) --reference golden/stories260K --text golden/tinystories_valid_head.txt
	$(LLMC) compile $(QUANT) -o $(QENGINE) --force
	$(LLMC) generate $(QENGINE) --prompt "Once upon a time" --max-tokens 60

bench: setup
	$(PY) benchmarks/decode_cpu.py --scheme w8a16 --scheme w4a16

clean:
	rm -rf build $(VENV) *.egg-info
