# Set-up and checks on a fresh Debian machine. Run as root: sudo make demo, sudo make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# command:Debian package, for what the tests and the demo run.
TOOLS := ip:iproute2 ping:iputils-ping socat:socat setpriv:util-linux unshare:util-linux

.PHONY: test demo tools venv clean

test: tools venv
	$(PY) -m pytest

demo: tools venv
	$(PY) tests/demo.py

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# apt-get update once, and only when something is missing.
tools:
	@missing=$$(for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done; \
	            $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
