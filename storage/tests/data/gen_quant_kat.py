#!/usr/bin/env python3
"""Writes quant_kat.json: known-answer vectors for strata's quant module, computed independently
of strata with gguf-py (llama.cpp's numpy reference, `pip install gguf`).

- "dequant": deterministic pseudo-random blocks (random bytes, sane finite f16/f32 scales) and
  the floats gguf.quants.dequantize gives for them. Q8_1 and Q8_K are not in gguf-py; their
  dequantization (y = d * q) is written out below with numpy.
- "quantize": pseudo-random inputs and the bytes of the reference quantizers (gguf.quants.quantize
  for F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; numpy transcriptions of ggml's quantize_row_q8_1_ref and
  quantize_row_q8_K_ref below).

Floats are stored as hex of their little-endian f32 bytes so the comparison can be exact.
Run from anywhere: python3 gen_quant_kat.py  (rewrites the JSON next to this script).
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
import gguf.quants as gq

rng = np.random.default_rng(20240611)

# (type, blocks, byte offsets of f16 scale fields that must hold sane finite values)
DEQUANT = [
    ("F32", 64, []), ("F16", 64, []), ("BF16", 64, []),
    ("Q4_0", 3, [0]), ("Q4_1", 3, [0, 2]), ("Q5_0", 3, [0]), ("Q5_1", 3, [0, 2]),
    ("Q8_0", 3, [0]), ("Q8_1", 3, [0, 2]),
    ("Q2_K", 2, [80, 82]), ("Q3_K", 2, [108]), ("Q4_K", 2, [0, 2]), ("Q5_K", 2, [0, 2]),
    ("Q6_K", 2, [208]), ("Q8_K", 2, []),
]


def sane_scales(n):
    return (rng.uniform(-1, 1, n) * np.exp2(rng.integers(-10, 3, n))).astype(np.float32)


def dequant_case(name, n_blocks, f16_offsets):
    ty = T[name]
    bs, ts = GGML_QUANT_SIZES[ty]
    if name == "Q8_1":
        ts = 36  # gguf-py lists 40 (an old f32 d/s layout); ggml's block_q8_1 is 2 f16 + 32 i8
    if name == "F32":
        raw = (rng.standard_normal(n_blocks) * 3).astype(np.float32).view(np.uint8)
    elif name == "F16":
        raw = (rng.standard_normal(n_blocks) * 3).astype(np.float16).view(np.uint8)
    elif name == "BF16":
        raw = ((rng.standard_normal(n_blocks) * 3).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, n_blocks * ts, dtype=np.uint8).reshape(n_blocks, ts)
        for off in f16_offsets:
            raw[:, off:off + 2] = sane_scales(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        if name == "Q8_K":
            raw[:, 0:4] = sane_scales(n_blocks).view(np.uint8).reshape(n_blocks, 4)
        raw = raw.reshape(-1)
    if name == "BF16":
        vals = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif name == "Q8_1":
        b = raw.reshape(n_blocks, ts)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        vals = (b[:, 4:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)
    elif name == "Q8_K":
        b = raw.reshape(n_blocks, ts)
        d = b[:, 0:4].copy().view(np.float32)
        vals = (d * b[:, 4:260].copy().view(np.int8).astype(np.float32)).reshape(-1)
    else:
        vals = gq.dequantize(raw, ty).reshape(-1).astype(np.float32)
    assert np.all(np.isfinite(vals)), name
    return {"type": name, "elements": int(vals.size), "bytes": raw.tobytes().hex(),
            "values": vals.astype("<f4").tobytes().hex()}


def nearest_int(x):
    return np.rint(x).astype(np.int32)  # round half to even, as ggml's nearest_int


def q8_1_ref(x):
    x = x.reshape(-1, 32)
    out = []
    for blk in x:
        amax = np.float32(np.abs(blk).max())
        d = np.float32(amax / np.float32(127))
        i_d = np.float32(1) / d if d != 0 else np.float32(0)
        qs = gq.np_roundf(blk * i_d).astype(np.int8)
        s = np.float32(np.float32(int(qs.astype(np.int32).sum())) * d)
        out.append(np.array([d], np.float16).tobytes() + np.array([s], np.float16).tobytes() + qs.tobytes())
    return b"".join(out)


def q8_k_ref(x):
    x = x.reshape(-1, 256)
    out = []
    for blk in x:
        amax = np.abs(blk).max()
        if amax == 0:
            out.append(bytes(292))
            continue
        mx = blk[int(np.argmax(np.abs(blk)))]
        iscale = np.float32(np.float32(-127) / mx)
        qs = np.minimum(127, nearest_int(iscale * blk)).astype(np.int8)
        bsums = qs.astype(np.int32).reshape(16, 16).sum(axis=1).astype(np.int16)
        d = np.float32(np.float32(1) / iscale)
        out.append(np.array([d], "<f4").tobytes() + qs.tobytes() + bsums.astype("<i2").tobytes())
    return b"".join(out)


def quant_case(name, n_blocks):
    ty = T[name]
    bs, _ = GGML_QUANT_SIZES[ty]
    x = (rng.standard_normal(n_blocks * bs) * rng.uniform(0.01, 4)).astype(np.float32)
    if n_blocks > 2:
        x[:bs] = 0  # an all-zero block exercises the d == 0 paths
        x[bs] = -x[bs + 1]  # equal magnitudes: the first one found sets the sign
    if name == "Q8_1":
        out = q8_1_ref(x)
    elif name == "Q8_K":
        out = q8_k_ref(x)
    else:
        out = gq.quantize(x.reshape(1, -1), ty).reshape(-1).view(np.uint8).tobytes()
    return {"type": name, "elements": int(x.size), "input": x.astype("<f4").tobytes().hex(), "bytes": out.hex()}


data = {
    "generator": "storage/tests/data/gen_quant_kat.py (gguf-py " + getattr(__import__("gguf"), "__version__", "?") + ")",
    "dequant": [dequant_case(*c) for c in DEQUANT],
    "quantize": [quant_case(n, b) for n, b in [("F16", 64), ("BF16", 64), ("Q4_0", 3), ("Q4_1", 3), ("Q5_0", 3),
                                                ("Q5_1", 3), ("Q8_0", 3), ("Q8_1", 3), ("Q8_K", 3)]],
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_kat.json")
with open(path, "w") as f:
    json.dump(data, f, indent=0)
    f.write("\n")
print("wrote", path, os.path.getsize(path), "bytes")
