# umbra's build and test entry points. `make test` is what CI runs (.ci/run).
GO ?= go

.PHONY: all deps build test guest guest-check fmt-check vet policy-test fuzz-smoke bench

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
	$(GO) run ./cmd/umbra policy test testdata/control/policy

# Debian packages the tests need: gcc/make/binutils build the test guest, libssl-dev the
# TPM simulator (cgo), swtpm and tpm2-tools the real-TPM and independent-verifier tests.
DEB_PACKAGES = gcc make binutils libssl-dev swtpm swtpm-tools tpm2-tools
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Every test, KVM ones included: UMBRA_REQUIRE_KVM makes a missing /dev/kvm a failure
# instead of a skip, UMBRA_REQUIRE_SWTPM likewise for swtpm.
# The Go tests run last so that their summary closes the output.
test: deps fmt-check guest-check vet policy-test
	UMBRA_REQUIRE_KVM=1 UMBRA_REQUIRE_SWTPM=1 $(GO) test -timeout 15m -count=1 ./...

# Run every fuzz target for FUZZTIME each (their seed corpora also run in make test).
FUZZTIME ?= 10s
fuzz-smoke:
	@set -e; for t in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs grep -h -o '^func Fuzz[A-Za-z0-9_]*' /dev/null | sort -u | sed 's/func //'); do \
		pkg=$$(grep -rl --include='*_test.go' "^func $$t(" . | head -1 | xargs dirname); \
		echo "fuzz $$pkg $$t"; \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s $$pkg >/dev/null; \
	done

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./...
