#!/bin/sh
# compare.sh BASE PKG ROUNDS NAME:BENCHTIME... runs a package's benchmarks side by side
# at commit BASE and at the work tree: it builds both test binaries, then, ROUNDS times,
# runs each benchmark on BASE's binary and then on the tree's, and writes every line with
# its side ("before "/"after ") and the load; pipe it to
# `go run ./internal/benchcompare` for the table of medians. Example (issue 14):
#   internal/benchcompare/compare.sh 1b25573 ./monitor 5 BenchmarkPause:20x \
#     BenchmarkHypercallVsBareMMIO:3000x | tee cmp.log | go run ./internal/benchcompare
set -eu
base=$1 pkg=$2 rounds=$3; shift 3
top=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'git -C "$top" worktree remove --force "$tmp/base" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$top" worktree add -q --detach "$tmp/base" "$base"
(cd "$tmp/base" && go test -c -o "$tmp/before.test" "$pkg")
(cd "$top" && go test -c -o "$tmp/after.test" "$pkg")
dir=$top/${pkg#./}
i=1
while [ "$i" -le "$rounds" ]; do
	for spec in "$@"; do
		name=${spec%%:*} bt=${spec##*:}
		for side in before after; do
			echo "### $side $i $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
			(cd "$dir" && "$tmp/$side.test" -test.run '^$' -test.bench "^$name\$" -test.benchtime "$bt" 2>&1) |
				grep -E '^(Benchmark|FAIL|---|panic)' | sed "s/^/$side /"
		done
	done
	i=$((i + 1))
done
