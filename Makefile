# Set-up and checks on a fresh Debian machine. Run as root: sudo make demo, sudo make test, sudo make bench.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# command:Debian package, for what the tests and the demo run.
TOOLS := ip:iproute2 ping:iputils-ping socat:socat setpriv:util-linux unshare:util-linux \
         wireguard-go:wireguard-go wg:wireguard-tools nft:nftables ethtool:ethtool man:man-db
# What only the bench runs: the load generator and the tunnel daemon it is compared with.
BENCH_TOOLS := iperf3:iperf3 fastd:fastd sysctl:procps

.PHONY: test demo bench man tools bench-tools venv bench-venv clean

test: tools venv
	$(PY) -m pytest

demo: tools venv
	$(PY) tests/demo.py

bench: bench-tools venv bench-venv
	$(PY) bench/bench.py

# The man pages, from each script's argparse parser; tests/test_readme.py checks they are
# up to date with the parsers, and setup.py installs them.
MANPAGE = $(VENV)/bin/argparse-manpage --project-name udpProxyServer --manual-section 8 \
          --manual-title "System Manager's Manual" --function build_parser
man: venv
	$(MANPAGE) --pyfile udpProxyServer.py --prog udpProxyServer --output man/udpProxyServer.8 \
	  --version $$($(PY) udpProxyServer.py --version | cut -d' ' -f2) \
	  --description "$$(sed -n 1p man/udpProxyServer.description)"
	$(MANPAGE) --pyfile udpProxyServerControl.py --prog udpProxyServerControl \
	  --output man/udpProxyServerControl.8 \
	  --version $$($(PY) udpProxyServerControl.py --version | cut -d' ' -f2) \
	  --description "$$(sed -n 1p man/udpProxyServerControl.description)"

# The same check and install as tools, with the bench's tools added to the list for this run only.
bench-tools:
	@$(MAKE) --no-print-directory tools TOOLS="$(TOOLS) $(BENCH_TOOLS)"

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# matplotlib draws the bench chart; it stays out of the project's own requirements.
bench-venv: $(VENV)/.bench-installed

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
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
