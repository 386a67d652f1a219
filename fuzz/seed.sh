#!/usr/bin/env bash
# Seeds the decode_status corpus with the real devices' statuses (both CBOR forms) from the
# protocol's test vectors, so fuzzing starts from valid input.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/decode_status
python3 - <<'PY'
import json
vectors = json.load(open("../crates/ajour-protocol/tests/data/dfu-wire-vectors.json"))
for i, vector in enumerate(vectors["status"]):
    for form in ("packed", "named"):
        with open(f"corpus/decode_status/{form}-{i}", "wb") as f:
            f.write(bytes.fromhex(vector[form]))
PY
echo "seeded $(ls corpus/decode_status | wc -l) inputs in fuzz/corpus/decode_status"
