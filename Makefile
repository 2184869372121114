# diskferry — see README.md. Every target that needs real parts runs scripts/setup.sh first,
# which installs only what is missing.
SHELL := /bin/bash
GO ?= go
export PATH := $(CURDIR)/.tools/bin:$(PATH)
BIN := $(CURDIR)/bin

.PHONY: setup build demo test test-unit bench lint

setup:
	@bash scripts/setup.sh

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/diskferry ./starter
	$(GO) build -o $(BIN)/diskferry-hub ./workers/hub
	$(GO) build -o $(BIN)/diskferry-sna ./workers/sna
	$(GO) build -o $(BIN)/diskferry-demo ./internal/lab/demo

# The main job on an embedded lab; KEEP=1 leaves it up for browsing the Web UI until Ctrl-C.
demo: setup build
	DISKFERRY_DEMO_KEEP=$(if $(KEEP),1,0) $(BIN)/diskferry-demo

# Everything, integration tests on real parts included. CI=true turns a missing part into a failure.
# The run gets a private TMPDIR; afterwards no process may still name it (scripts/leftovers.sh).
test: setup lint
	@tmp=$$(mktemp -d /tmp/df.XXXXXX); \
	  CI=$${CI:-true} TMPDIR=$$tmp $(GO) test -race -count=1 -timeout 40m ./...; rc=$$?; \
	  bash scripts/leftovers.sh $$tmp || rc=1; \
	  rm -rf $$tmp; exit $$rc

# No external parts: seconds.
test-unit:
	$(GO) test -race -count=1 -short ./...

bench: setup build
	@bash scripts/bench.sh
	@$(GO) test -run '^$$' -bench BackupEndToEnd -benchtime 3x ./internal/lab | grep '^bench '
	@$(GO) test -run '^$$' -bench '^BenchmarkConcurrent20$$' -benchtime 1x -timeout 30m ./internal/lab | grep '^bench '
	@$(GO) test -run '^$$' -bench '^BenchmarkExportPath$$' -benchtime 1x ./internal/lab | grep '^bench '
	@$(GO) test -run '^$$' -bench '^BenchmarkTunnelWAN$$' -benchtime 1x ./internal/tunnel | grep '^bench '
	@$(GO) test -run '^$$' -bench '^BenchmarkTunnelMulti$$' -benchtime 1x ./internal/tunnel | grep '^bench '
	@$(GO) test -run '^$$' -bench '^BenchmarkBandwidthWAN$$' -benchtime 1x ./internal/limits | grep '^bench '

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' ; git ls-files -o --exclude-standard '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags record ./workflows
	TEMPORAL_DB_PASSWORD=validate docker-compose -f docker-compose.yml --profile sna config -q
