#!/usr/bin/env bash
# Regenerates the example outputs quoted in README.md, so they cannot go stale.
#
#   scripts/readme_examples.sh          the `cllm train --config tiny ...` example (seconds)
#   scripts/readme_examples.sh --all    also the default run of "Train" (about 2.5 minutes)
#
# Each example is the fenced block after a `<!-- readme-example: NAME -->` line in README.md;
# its first line is the command (`$ cllm ...`), run here in a scratch directory with this
# checkout's release binary on the PATH as `cllm` (as after `cargo install --path .`), and the
# rest of the block is replaced by what it printed. tests/cli_readme.rs checks that the tiny
# example's deterministic fields (losses, validation, sample bytes) still match the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --quiet
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/bin"
ln -s "$root/target/release/cllm" "$scratch/bin/cllm"
ln -s "$root/data" "$scratch/data"  # what the eval example reads

# The commands of example NAME (its `$ ` lines without the `$ `), one a line.
commands_of() {
    awk -v name="$1" '$0 == "<!-- readme-example: " name " -->" { state = 1; next }
        state == 1 && /^```/ { state = 2; next }
        state == 2 && /^```/ { exit }
        state == 2 && /^\$ / { sub(/^\$ /, ""); print }' README.md
}

# Replaces what is between the fences of example NAME with file $2.
replace_block() {
    awk -v name="$1" -v body="$2" '
        $0 == "<!-- readme-example: " name " -->" { state = 1; print; next }
        state == 1 && /^```/ { print; while ((getline line < body) > 0) print line; state = 2; next }
        state == 2 && /^```/ { state = 0; print; next }
        state == 2 { next }
        { print }' README.md > "$scratch/README.md"
    cp "$scratch/README.md" README.md
}

# Runs example NAME's commands in the scratch directory and writes each `$ ` line followed by
# its output (the first $2 lines of it and `...`, when $2 is given) to $scratch/NAME.
run_example() {
    local name=$1 keep=${2:-} cmd
    : > "$scratch/$name"
    while IFS= read -r cmd; do
        echo "running: $cmd" >&2
        echo "\$ $cmd" >> "$scratch/$name"
        (cd "$scratch" && PATH="$scratch/bin:$PATH" bash -c "$cmd") > "$scratch/out" </dev/null
        if [ -n "$keep" ]; then
            head -n "$keep" "$scratch/out" >> "$scratch/$name"
            echo '...' >> "$scratch/$name"
        else
            cat "$scratch/out" >> "$scratch/$name"
        fi
    done < <(commands_of "$name")
    [ -s "$scratch/$name" ] || { echo "error: README.md has no example $name" >&2; exit 1; }
}

run_example train-tiny
replace_block train-tiny "$scratch/train-tiny"

if [ "${1:-}" = "--all" ]; then
    # The default run, 2000 steps (about 2.5 minutes on 2 cores): its first and last progress
    # lines, the summary and the start of the sample; then generate and eval read its run.
    start=$(date +%s)
    run_example train-default
    echo "default run: $(($(date +%s) - start)) s wall" >&2
    out="$scratch/train-default"
    {
        head -n 1 "$out"
        grep -m1 "^step " "$out"
        echo '...'
        sed -n '/^step 2000\/2000/,/^sample (/p' "$out"
        sed -n '/^sample (/{n;p;q}' "$out"
        echo '...'
    } > "$scratch/train-default.short"
    replace_block train-default "$scratch/train-default.short"
    run_example generate 2
    replace_block generate "$scratch/generate"
    run_example eval
    replace_block eval "$scratch/eval"
fi
git --no-pager diff --stat README.md
