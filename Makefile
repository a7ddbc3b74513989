# The two commands: `make demo` and `make test`. Both create .venv and install when needed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
CONFIG  ?= configs/default.toml
BUNDLES ?= bundles/default

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,test,loadtest,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.cli.demo --config $(CONFIG) --bundles $(BUNDLES)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

clean:
	rm -rf .venv bundles reports protos/_gen
