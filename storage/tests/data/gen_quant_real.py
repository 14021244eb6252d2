#!/usr/bin/env python3
"""Writes quant_real.json: for a few tensors of each quant type in the two development models,
the absolute file offset of their data (found with gguf-py's reader), the first 512 values and
the SHA-256 of the whole tensor dequantized to little-endian f32 by gguf.quants.dequantize.

The Rust test reads the bytes at those offsets directly (it must not depend on strata's GGUF
parser) and skips when a model file is missing or has a different size.
"""
import hashlib
import json
import os

import numpy as np
import gguf.quants as gq
from gguf import GGUFReader

MODELS = os.path.expanduser("~/.local/share/strata/models")
FILES = ["gemma3-270m.gguf", "qwen2.5-coder-1.5b.gguf"]
PER_TYPE = 2

out = []
for fname in FILES:
    path = os.path.join(MODELS, fname)
    r = GGUFReader(path)
    by_type = {}
    for t in r.tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        by_type.setdefault(t.tensor_type.name, []).append(t)
    for tname, ts in sorted(by_type.items()):
        # the smallest tensors keep the test fast
        for t in sorted(ts, key=lambda t: (int(t.n_elements), t.name))[:PER_TYPE]:
            vals = gq.dequantize(np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type).reshape(-1).astype("<f4")
            assert vals.size == int(t.n_elements)
            out.append({
                "file": fname, "file_size": os.path.getsize(path), "tensor": t.name, "type": tname,
                "offset": int(t.data_offset), "elements": int(t.n_elements), "bytes": int(t.n_bytes),
                "first_values": vals[:512].tobytes().hex(),
                "sha256": hashlib.sha256(vals.tobytes()).hexdigest(),
            })
            print(fname, t.name, tname, t.n_elements)

dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_real.json")
with open(dst, "w") as f:
    json.dump({"generator": "storage/tests/data/gen_quant_real.py", "tensors": out}, f, indent=1)
    f.write("\n")
print("wrote", dst, os.path.getsize(dst), "bytes")
