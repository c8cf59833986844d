# umbra's build and test entry points. `make test` is what CI runs (.ci/run).
GO ?= go

.PHONY: all deps build test guest guest-check fmt-check vet policy-test fuzz-smoke bench linux deadcode

all: build

build:
	$(GO) build -o umbra ./cmd/umbra

# Rebuild the test guest image from testdata/guest into guestimage/.
guest:
	$(MAKE) -C testdata/guest

# Fail if the committed guest image is not what the sources build.
guest-check:
	$(MAKE) -C testdata/guest check

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

policy-test:
	$(GO) run ./cmd/umbra policy test testdata/policies
	$(GO) run ./cmd/umbra policy test testdata/e2e/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/linux/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/disk/policy
	$(GO) run ./cmd/umbra policy test testdata/control/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/migration/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/snapshot/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/network/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/hotplug/policy
	$(GO) run ./cmd/umbra policy test testdata/e2e/backup/policy

# Debian packages the tests need: gcc/make/binutils build the test guest, libssl-dev the
# TPM simulator (cgo), swtpm and tpm2-tools the real-TPM and independent-verifier tests;
# linux-source-6.1 and the kernel's build tools (bc bison flex libelf-dev cpio xz-utils)
# the test Linux guest (testdata/linux); qemu-utils (qemu-img, qemu-io) the qcow2 tests that
# check umbra's images with QEMU; python3-jsonschema the CEL-JSON reader that checks
# umbra's CEL-JSON export (testdata/cel); e2fsprogs (mke2fs -d, debugfs, e2fsck) the disk
# journeys; chromium the web console's browser test (cmd/umbra TestServeBrowserConsole).
DEB_PACKAGES = gcc make binutils libssl-dev swtpm swtpm-tools tpm2-tools chromium \
	linux-source-6.1 bc bison flex libelf-dev cpio xz-utils qemu-utils python3-jsonschema \
	e2fsprogs
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The test Linux guest (testdata/linux): built once per change of its inputs into a cache
# outside the clone, keyed by the SHA-256 of the build script, config fragment, patches,
# init, the linux-source package version and the compiler, and linked at
# testdata/linux/out. A fresh cache costs one kernel build (about 4 minutes on 2 CPUs).
LINUX_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/umbra/linux
linux: deps
	@set -e; key=$$( { cat testdata/linux/build.sh testdata/linux/config.fragment testdata/linux/init.c testdata/linux/patches/*.patch; \
		dpkg-query -W -f='$${Version}' linux-source-6.1; gcc --version | head -1; } | sha256sum | cut -c1-16); \
	dir="$(LINUX_CACHE)/$$key"; \
	if [ ! -f "$$dir/done" ]; then \
		echo "building the test Linux kernel into $$dir"; \
		rm -rf "$$dir.tmp"; testdata/linux/build.sh "$$dir.tmp"; touch "$$dir.tmp/done"; \
		rm -rf "$$dir"; mv "$$dir.tmp" "$$dir"; \
	fi; \
	ln -sfn "$$dir" testdata/linux/out; echo "test Linux kernel: $$dir"

# Every test, KVM ones included: UMBRA_REQUIRE_KVM makes a missing /dev/kvm a failure
# instead of a skip, UMBRA_REQUIRE_SWTPM likewise for swtpm, UMBRA_REQUIRE_LINUX for the
# test Linux kernel (make linux).
# The Go tests run last so that their summary closes the output.
test: deps fmt-check guest-check vet policy-test linux
	UMBRA_REQUIRE_KVM=1 UMBRA_REQUIRE_SWTPM=1 UMBRA_REQUIRE_LINUX=1 $(GO) test -timeout 15m -count=1 ./...

# What deadcode reports unreachable must be listed with a reason in
# internal/layers/deadcode.txt, and what is listed must still be reported. Needs
# deadcode (go install golang.org/x/tools/cmd/deadcode@latest); about a minute.
DEADCODE ?= $(shell command -v deadcode || echo $$($(GO) env GOPATH)/bin/deadcode)
deadcode:
	@command -v $(DEADCODE) >/dev/null || { echo "deadcode: $(DEADCODE) not found; install it: go install golang.org/x/tools/cmd/deadcode@latest"; exit 2; }
	@set -e; got=$$(mktemp); want=$$(mktemp); trap 'rm -f $$got $$want' EXIT; \
	{ $(DEADCODE) -test ./... | sed 's/^/test /'; $(DEADCODE) ./cmd/umbra | sed 's/^/binary /'; } | \
		sed -E 's/^([a-z]+) ([^:]+):[0-9]+:[0-9]+: unreachable func: (.*)$$/\1 \2 \3/' | sort > $$got; \
	sed -e 's/#.*//' -e '/^[[:space:]]*$$/d' internal/layers/deadcode.txt | awk '{print $$1, $$2, $$3}' | sort > $$want; \
	if ! diff -u $$want $$got; then echo "deadcode: lines with - are listed but reachable now, lines with + are unreachable and not listed (internal/layers/deadcode.txt)"; exit 1; fi; \
	echo "deadcode: $$(wc -l < $$got) unreachable functions, each listed with its reason"

# Run every fuzz target for FUZZTIME each (their seed corpora also run in make test).
FUZZTIME ?= 10s
fuzz-smoke:
	@set -e; for t in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs grep -h -o '^func Fuzz[A-Za-z0-9_]*' /dev/null | sort -u | sed 's/func //'); do \
		pkg=$$(grep -rl --include='*_test.go' "^func $$t(" . | head -1 | xargs dirname); \
		echo "fuzz $$pkg $$t"; \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s $$pkg >/dev/null; \
	done

# The benchmarks behind docs/performance.md, each with the iterations its cost allows,
# then the table of every ratio against its target (internal/benchtable; it fails if
# a target is missed or a row has no figure). Not part of `make test`: it takes
# minutes and its verdicts depend on the machine's load. BENCH_COUNT runs each
# benchmark that many times; the table shows the range.
BENCH_OUT ?= bench.out
BENCH_COUNT ?= 1
bench: SHELL := /bin/bash
bench:
	@set -e; : > $(BENCH_OUT); \
	b() { pkg=$$1; pat=$$2; n=$$3; \
		$(GO) test -run '^$$' -bench "$$pat" -benchtime "$$n" -count $(BENCH_COUNT) -timeout 60m $$pkg 2>&1 | tee -a $(BENCH_OUT); \
		test $${PIPESTATUS[0]} -eq 0; }; \
	b ./monitor '^BenchmarkCloakCompute$$' 5x; \
	b ./virtio/blk '^BenchmarkRequest$$' 200x; \
	b ./virtio/net '^BenchmarkNICTap$$' 2000x; \
	b ./monitor '^BenchmarkVirtioNotify$$' 20000x; \
	b ./monitor '^BenchmarkVirtioBlkRequest$$' 200x; \
	b ./monitor '^BenchmarkCloakAppRun$$' 5x; \
	b ./monitor '^BenchmarkCloakTransitions$$' 200x; \
	b ./monitor '^BenchmarkCloakServeExit$$' 1000x; \
	b ./monitor '^BenchmarkPageProt(Cloaked)?Violation$$' 2000x; \
	b ./guard '^BenchmarkGuardDecision$$' 200x; \
	b ./serve/ticket '^BenchmarkTicket$$' 20000x; \
	b ./cmd/umbra '^BenchmarkRun(History|Cloaked)$$' 5x; \
	b ./sealing '^BenchmarkSealing$$//^seal$$' 50x; \
	b ./attest/verify '^BenchmarkQuote$$' 100x; \
	b ./attest/audit '^BenchmarkOpenHistory$$' 5x; \
	b ./attest/eventlog '^BenchmarkOpenEventLog$$' 3x; \
	b ./policy '^BenchmarkDecisionPerRule$$' 300x; \
	b ./monitor '^BenchmarkCloakScaling$$' 3x; \
	b ./snapshot '^BenchmarkBlock(Seal|Open)$$' 300x; \
	b ./kvm '^BenchmarkMarkCOW$$' 7x; \
	b ./checkpoint '^BenchmarkLazyRestoreFault$$' 10x; \
	b ./checkpoint '^BenchmarkTimeToFirstInstruction$$' 10x; \
	b ./checkpoint '^BenchmarkIncrementalSize$$' 1x; \
	b ./monitor '^BenchmarkCheckpointPause$$' 20x; \
	b ./monitor '^BenchmarkCheckpointDiskPause$$' 5x; \
	b ./monitor '^BenchmarkCheckpointProtectedDiskPause$$' 5x; \
	b ./monitor '^BenchmarkVMLazyRestoreFault$$' 512x; \
	b ./monitor '^BenchmarkVMTimeToFirstInstruction$$' 3x; \
	b ./migration '^BenchmarkMigrate$$' 2x; \
	b ./migration '^BenchmarkMigrateLinuxVsQEMU$$' 2x; \
	b ./backup '^BenchmarkBackupIncrementalSize$$' 3x; \
	echo; $(GO) run ./internal/benchtable < $(BENCH_OUT)
