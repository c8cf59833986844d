# umbra's build and test entry points. `make test` is what CI runs (.ci/run).
GO ?= go

.PHONY: all build test guest guest-check fmt-check vet policy-test fuzz-smoke bench

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

# Every test, KVM ones included: UMBRA_REQUIRE_KVM makes a missing /dev/kvm a failure
# instead of a skip.
test: fmt-check guest-check vet
	UMBRA_REQUIRE_KVM=1 $(GO) test -timeout 15m -count=1 ./...
	$(MAKE) policy-test

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./...
