#!/usr/bin/env bash
# The GPU benchmark in one call: every architecture at its published size (--preset paper) against its
# plain-PyTorch twin on 256 sentences x (50 + 50) tokens (the Transformer base reference shape), bf16,
# eager then torch.compile; each table with the measured bf16 matmul ceiling and MFU per model.
#
#   bash harness/bench/gpu.sh [OUT_DIR] [extra harness.bench flags...]
#
# Writes OUT_DIR/{paper_eager,paper_compiled}.json (default results/bench) and prints the tables.
# MODELS=transformer,lstm limits the architectures; REPEATS (default 5) sets the timed rounds.
set -euo pipefail
out="${1:-results/bench}"
shift || true
mkdir -p "$out"
common=(--suite train --preset paper --device cuda --precision bf16 --repeats "${REPEATS:-5}"
        --models "${MODELS:-transformer,lstm,gru,convs2s,bytenet}" "$@")
python -m seqbench.harness.bench "${common[@]}" --json "$out/paper_eager.json"
python -m seqbench.harness.bench "${common[@]}" --compile --json "$out/paper_compiled.json"
