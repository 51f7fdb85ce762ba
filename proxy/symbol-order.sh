#!/bin/sh
# Writes proxy/symbol-order.txt: the functions of BINARY that the callgrind
# profiles ran, in the order first seen. Profiles must be recorded with
# `--demangle=no --compress-strings=no` (docs/PERFORMANCE.md, "Idle memory").
#
# usage: proxy/symbol-order.sh target/release/tern-proxy cg.out...
set -eu
bin=$1
shift
nm "$bin" | awk '$2 ~ /^[tTwW]$/ { print $3 }' | sort -u >"${TMPDIR:-/tmp}/tern-symbols.$$"
awk -v syms="${TMPDIR:-/tmp}/tern-symbols.$$" '
    BEGIN { while ((getline s < syms) > 0) known[s] = 1 }
    /^c?fn=/ {
        name = substr($0, index($0, "=") + 1)
        sub(/\047[0-9]+$/, "", name)   # callgrind marks recursion levels as name'\''N
        if ((name in known) && !(name in seen)) { seen[name] = 1; print name }
    }' "$@" >"$(dirname "$0")/symbol-order.txt"
rm -f "${TMPDIR:-/tmp}/tern-symbols.$$"
wc -l "$(dirname "$0")/symbol-order.txt"
