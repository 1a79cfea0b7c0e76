# cbtfs — see README.md. `make test` and `make demo` are the two commands a
# newcomer needs; both install the Debian packages they lack when run as root.

GO        ?= go
BIN       := bin/cbtfs
FUZZTIME  ?= 60s
DEMO_DIR  ?= demo
PKGS_TEST := qemu-utils libnbd-bin fuse3 rsync
PKGS_BENCH := $(PKGS_TEST) nbdfuse

.PHONY: all build test unit integration demo demo-stop bench fuzz lint cover deps deps-bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/cbtfs

# deps installs the Debian packages the tests drive (qemu-img, qemu-io,
# qemu-nbd, nbdinfo, nbdcopy, fusermount3, rsync) when some are missing.
deps:
	@./scripts/install-deps $(PKGS_TEST)

deps-bench:
	@./scripts/install-deps $(PKGS_BENCH)

# test runs every test, with the race detector. CI sets
# CBTFS_REQUIRE_TOOLS=1 so that a missing tool fails instead of skipping.
test: deps
	$(GO) test -race -timeout 25m ./...

unit:
	$(GO) test -race ./qcow/... ./dirtymap/... ./nbdlink/... ./internal/...

integration: deps
	CBTFS_REQUIRE_TOOLS=1 $(GO) test -race -timeout 25m ./integration/...

demo: deps build
	@./scripts/demo $(DEMO_DIR)

demo-stop:
	@./scripts/demo-stop $(DEMO_DIR)

# bench prints one line per benchmark: name, cbtfs figure, peer figure,
# ratio. The peers (qemu-nbd, nbdfuse, nbdinfo) run in the same run.
bench: deps-bench build
	@$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./integration/ | ./scripts/bench-summary

# fuzz runs each fuzz target for FUZZTIME.
fuzz:
	@./scripts/fuzz $(FUZZTIME)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

cover:
	$(GO) test -coverprofile=cover.out ./qcow/... ./dirtymap/... ./nbdlink/...
	$(GO) tool cover -func=cover.out | tail -1

clean:
	rm -rf bin cover.out
