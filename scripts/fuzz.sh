#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (default 60) on the stable
# toolchain. The targets link libFuzzer (the libfuzzer-sys crate builds it with the C++
# compiler); coverage comes from LLVM's SanitizerCoverage pass, which stable rustc runs with
# `-C passes=sancov-module` (the flags cargo-fuzz passes, minus its nightly-only sanitizer).
# Each target starts from its committed seed corpus (fuzz/corpus/<target>, read only) and
# keeps what it finds in a scratch corpus under the target directory; a crash leaves its input
# in fuzz/artifacts/<target>/ and fails the script. Usage: scripts/fuzz.sh [target...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode_body timestamp column_type)
host=$(rustc -vV | sed -n 's/^host: //p')
# Its own target directory: the instrumented build must not clobber the normal one.
target_dir=${CARGO_TARGET_DIR:-$PWD/../target}/fuzz
flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
)
# With an explicit --target the flags reach the fuzzed code but not build scripts and proc
# macros, which cannot link libFuzzer.
RUSTFLAGS="${flags[*]}" cargo build --locked --release --target "$host" --target-dir "$target_dir" \
  "${targets[@]/#/--bin=}"
for target in "${targets[@]}"; do
  scratch="$target_dir/corpus/$target"
  mkdir -p "$scratch" "artifacts/$target"
  echo "fuzzing $target for ${seconds}s"
  "$target_dir/$host/release/$target" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
    -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$target/" "$scratch" "corpus/$target"
done
