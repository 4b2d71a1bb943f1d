#!/usr/bin/env bash
# Run each cargo-fuzz target briefly: `fuzz/smoke.sh [seconds per target] [target...]`.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a compiler that accepts `-Z` flags: a
# nightly toolchain if rustup has one, otherwise the stable one with RUSTC_BOOTSTRAP=1. Without
# cargo-fuzz it says so and exits 0: the same properties run on stable in
# `cargo test -p roam-proto --test fuzz_smoke` (proptest), which is part of every `cargo test`.
#
# The seed corpora in fuzz/corpus/<target>/ are read, never written: new inputs go to
# fuzz/corpus-work/<target>/ (ignored by git). Crashes land in fuzz/artifacts/<target>/ and
# make the script exit non-zero. Debug assertions (overflow checks) are on. ROAM_FUZZ_STABLE=1
# skips the nightly toolchain even if there is one.
set -euo pipefail

secs="${1:-30}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_decode image_decode session_ops packet_decode datagram_image_decode handshake sealed_decode)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)."
    echo "The proptest equivalent runs in: cargo test -p roam-proto --test fuzz_smoke"
    exit 0
fi

# Prefer a nightly toolchain (unless ROAM_FUZZ_STABLE=1); fall back to the default toolchain
# with RUSTC_BOOTSTRAP=1.
fuzz=()
if [ -z "${ROAM_FUZZ_STABLE:-}" ] && rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
    how="nightly ($(rustup run nightly rustc --version))"
elif RUSTC_BOOTSTRAP=1 rustc -Z help >/dev/null 2>&1; then
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    how="stable with RUSTC_BOOTSTRAP=1 ($(rustc --version))"
else
    echo "fuzz smoke skipped: no nightly toolchain and RUSTC_BOOTSTRAP=1 does not enable -Z flags."
    echo "The proptest equivalent runs in: cargo test -p roam-proto --test fuzz_smoke"
    exit 0
fi
echo "fuzzing with $(cargo fuzz --version) on $how, ${secs}s per target"

for t in "${targets[@]}"; do
    work="corpus-work/$t"
    mkdir -p "$work" "corpus/$t"
    echo "== $t"
    log="$work.log"
    opts=()
    if [ "$t" = session_ops ]; then
        # Operation lists need room from the start (libFuzzer would grow the limit slowly).
        opts=(-max_len=1024 -len_control=0)
    fi
    rc=0
    "${fuzz[@]}" run --debug-assertions "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 "${opts[@]}" >"$log" 2>&1 || rc=$?
    grep -E '^Done|^stat::(number_of_executed_units|new_units_added)|panicked|ERROR|SUMMARY|Test unit written' "$log" || true
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $t (exit $rc; full log $here/$log, reproducer in $here/artifacts/$t/)"
        exit 1
    fi
done
echo "fuzz smoke passed"
