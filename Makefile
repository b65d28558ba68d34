# make demo  - set up a virtualenv, compile and explain the bundled digits example
# make test  - set up the virtualenv and run the test suite
# make bench - benchmarks (see benchmarks/)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# lrpc serve's environment: PyTriton pins numpy<2, the main one has numpy 2
SERVE_VENV  ?= .venv-serve
SERVE_STAMP  = $(SERVE_VENV)/.installed
# the deploy tools the tests make transformer files with (optimum, onnxruntime-genai's
# builder), whose transformers pin clashes with the main one: tests/deploy-requirements.txt
DEPLOY_VENV  ?= .venv-deploy
DEPLOY_STAMP  = $(DEPLOY_VENV)/.installed
# LXT 2.1 (benchmarks/transformer_scale.py's contender) is tested with transformers 4.52.4, the main
# environment has transformers 5: benchmarks/lxt-requirements.txt
LXT_VENV  ?= .venv-lxt
LXT_STAMP  = $(LXT_VENV)/.installed
DEMO    = examples/digits

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: it takes the CPU build that lies on the machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# zennit pulls in a torchvision build that fails to import beside the CPU torch, and
	# transformers imports torchvision whenever it is installed; nothing here needs it
	# (the tests stub the one module zennit imports)
	$(PY) -m pip uninstall -q -y torchvision
	# models from the wild for the tests: the ONNX files inside the rapidocr, ddddocr and
	# silero-vad wheels (read from the wheels themselves; the packages are not installed)
	$(PY) -m pip download -q --no-deps rapidocr-onnxruntime==1.4.4 ddddocr==1.6.1 silero-vad==6.2.3 -d $(VENV)/wheels
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[cpu,serve]'
	touch $(SERVE_STAMP)

$(DEPLOY_STAMP): tests/deploy-requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install -q torch==2.13.0
	$(DEPLOY_VENV)/bin/python -m pip install -q -r tests/deploy-requirements.txt
	touch $(DEPLOY_STAMP)

$(LXT_STAMP): benchmarks/lxt-requirements.txt
	$(PYTHON) -m venv $(LXT_VENV)
	$(LXT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LXT_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LXT_VENV)/bin/python -m pip install -q -r benchmarks/lxt-requirements.txt
	# lxt's declared dependencies (accelerate, bitsandbytes, open_clip_torch, matplotlib, zennit)
	# are for its other modes; its efficient mode needs torch and transformers only
	$(LXT_VENV)/bin/python -m pip install -q --no-deps lxt==2.1
	# no CPU torchvision for this torch (benchmarks/transformer_scale.py stubs the module LXT imports)
	$(LXT_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $(LXT_STAMP)

install: $(STAMP) $(SERVE_STAMP) $(DEPLOY_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lrpc check $(DEMO)/digits_cnn.onnx
	# EpsilonPlus: on 8x8 digits the FlatRule of EpsilonPlusFlat spreads the first layer's
	# relevance evenly over each 3x3 window, which blurs strokes two pixels wide into blobs
	$(VENV)/bin/lrpc compile $(DEMO)/digits_cnn.onnx -o demo_model/digits_cnn.lrp.onnx --composite EpsilonPlus
	$(VENV)/bin/lrpc explain demo_model/digits_cnn.lrp.onnx $(DEMO)/samples.npy -o demo_out --scale 16 --overview

test: $(STAMP) $(SERVE_STAMP) $(DEPLOY_STAMP)
	LRPC_SERVE_PYTHON=$(SERVE_VENV)/bin/python LRPC_DEPLOY_PYTHON=$(DEPLOY_VENV)/bin/python $(PY) -m pytest -n 2 tests

bench: $(STAMP) $(SERVE_STAMP) $(LXT_STAMP)
	$(PY) benchmarks/run.py --output BENCHMARKS.md
	$(PY) benchmarks/floor.py --output BENCHMARKS.md
	$(PY) benchmarks/memory.py --output BENCHMARKS.md
	$(PY) benchmarks/targets.py --output BENCHMARKS.md
	$(PY) benchmarks/explain_throughput.py --output BENCHMARKS.md
	$(PY) benchmarks/deployed.py --output BENCHMARKS.md
	$(PY) benchmarks/startup.py --output BENCHMARKS.md
	$(PY) benchmarks/recurrent.py --output BENCHMARKS.md
	$(PY) benchmarks/methods.py --output BENCHMARKS.md
	$(PY) benchmarks/transformer_scale.py --lxt-python $(LXT_VENV)/bin/python --output BENCHMARKS.md
	$(PY) benchmarks/serve_load.py --serve-python $(SERVE_VENV)/bin/python --output BENCHMARKS.md

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(DEPLOY_VENV) $(LXT_VENV) demo_out demo_model .pytest_cache
