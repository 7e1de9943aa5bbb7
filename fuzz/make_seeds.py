#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

Tiny files made here (no model is downloaded or copied): GGUF files and delta packs through
the `gguf` Python package (pip install gguf==0.19.0), safetensors files by hand (8-byte length,
JSON header, data), merge configs from the examples in src/merge/config.rs. Run from anywhere;
existing seed-* files are overwritten, other corpus files are left alone.
"""

import json
import os
import re
import struct
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)


def put(target, name, data):
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= 64 * 1024, (target, name, len(data))
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def gguf_bytes(build):
    """Bytes of a GGUF file that `build(writer)` fills."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.gguf")
        w = GGUFWriter(path, "llama")
        build(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(path, "rb") as f:
            return f.read()


# ---- gguf_header -------------------------------------------------------------------------

def tiny_model(w):
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0])
    w.add_tensor("token_embd.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), dtype=np.float16))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 68), dtype=np.uint8),
                 raw_dtype=Q.Q8_0)  # 2 rows of 64 Q8_0 values
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))


def only_metadata(w):
    w.add_uint32("general.alignment", 64)
    w.add_bool("b", True)
    w.add_int64("i", -5)
    w.add_float64("f", 0.25)
    w.add_array("u", [1, 2, 3])
    w.add_array("nested", [[1, 2], [3]])


def bf16_tensor(w):
    w.add_tensor("t", np.zeros((3, 2), dtype=np.uint16), raw_dtype=Q.BF16)


def gguf_seeds():
    put("gguf_header", "tiny-model.gguf", gguf_bytes(tiny_model))
    put("gguf_header", "metadata-only.gguf", gguf_bytes(only_metadata))
    put("gguf_header", "bf16.gguf", gguf_bytes(bf16_tensor))


# ---- delta_pack --------------------------------------------------------------------------

def pack(mask, values, tensors, density=0.5):
    """A pack of `tensors` [(base name, kept values as f32 array, indices or None)]."""
    def build(w):
        w.add_string("general.type", "ggmerge.delta")
        w.add_string("delta.base.fingerprint", "0123456789abcdef")
        w.add_string("delta.method", "dare" if mask == "philox" else "magnitude")
        w.add_float64("delta.density", density)
        w.add_uint64("delta.seed", 42)
        w.add_uint32("delta.stream", 0)
        w.add_string("delta.rescale", "inverse")
        w.add_string("delta.mask", mask)
        w.add_string("delta.values", values)
        w.add_key_value("delta.kept", [len(v) for _, v, _ in tensors], GGUFValueType.ARRAY,
                        sub_type=GGUFValueType.UINT64)
        for name, v, idx in tensors:
            stored = v if len(v) else np.zeros(1, dtype=np.float32)
            if values == "F32":
                w.add_tensor(name + ".dv", stored.astype(np.float32))
            elif values == "F16":
                w.add_tensor(name + ".dv", stored.astype(np.float16))
            elif values == "BF16":
                bits = (stored.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                w.add_tensor(name + ".dv", bits, raw_dtype=Q.BF16)
            elif values == "Q8_0":
                n = -(-len(stored) // 32)
                blocks = np.zeros((n, 34), dtype=np.uint8)
                blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
                flat = np.zeros(n * 32, dtype=np.int8)
                flat[: len(stored)] = np.clip(stored * 100, -127, 127).astype(np.int8)
                blocks[:, 2:] = flat.reshape(n, 32).view(np.uint8)
                w.add_tensor(name + ".dv", blocks.reshape(-1), raw_dtype=Q.Q8_0)
            if idx is not None:
                w.add_tensor(name + ".di", np.array(idx, dtype=np.int32))
    return gguf_bytes(build)


def pack_seeds():
    v = np.linspace(-1, 1, 12, dtype=np.float32)
    put("delta_pack", "philox-f32.dpk.gguf",
        pack("philox", "F32", [("blk.0.attn_q.weight", v, None),
                               ("output_norm.weight", v[:3], None)]))
    put("delta_pack", "explicit-f16.dpk.gguf",
        pack("explicit", "F16", [("blk.0.ffn_up.weight", v[:5], [0, 3, 7, 8, 40]),
                                 ("token_embd.weight", v[:1], [5])]))
    put("delta_pack", "dense-bf16.dpk.gguf",
        pack("dense", "BF16", [("output_norm.weight", v[:8], None)], density=1.0))
    put("delta_pack", "explicit-q8_0.dpk.gguf",
        pack("explicit", "Q8_0", [("blk.0.attn_q.weight", v[:10], list(range(0, 30, 3)))]))
    put("delta_pack", "philox-q8_0.dpk.gguf",
        pack("philox", "Q8_0", [("blk.0.ffn_up.weight", v, None)], density=0.25))
    # Structured mode (first byte not `G`): arbitrary's decoding of the rest picks the spec.
    put("delta_pack", "spec-zeros", b"S" + bytes(64))
    put("delta_pack", "spec-ones", b"S" + bytes([1]) * 256)
    put("delta_pack", "spec-mixed", b"S" + bytes(range(256)))


# ---- safetensors_header ------------------------------------------------------------------

def st(tensors, metadata=None, pad=True):
    """A safetensors file: `tensors` [(name, dtype, shape, bytes)] in order."""
    header, data, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    js = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js + data


def f32(n, start=0.0):
    return np.arange(start, start + n, dtype=np.float32).tobytes()


def safetensors_seeds():
    put("safetensors_header", "empty", st([]))
    put("safetensors_header", "metadata-only", st([], {"format": "pt"}))
    put("safetensors_header", "llama", st([
        ("model.embed_tokens.weight", "F32", [4, 8], f32(32)),
        ("model.layers.0.self_attn.q_proj.weight", "F32", [8, 8], f32(64)),
        ("model.layers.0.self_attn.k_proj.weight", "F16", [4, 8],
         np.ones(32, dtype=np.float16).tobytes()),
        ("model.layers.0.input_layernorm.weight", "BF16", [8], bytes(16)),
        ("model.norm.weight", "F32", [8], f32(8)),
        ("lm_head.weight", "F32", [4, 8], f32(32)),
    ], {"format": "pt"}))
    put("safetensors_header", "gemma-norms", st([
        ("model.layers.0.post_attention_layernorm.weight", "BF16", [4], bytes(8)),
        ("model.layers.0.pre_feedforward_layernorm.weight", "F16", [4], bytes(8)),
        ("model.norm.weight", "F32", [4], f32(4)),
    ]))
    put("safetensors_header", "scalar-and-odd-dtypes", st([
        ("model.norm.weight", "F32", [], f32(1)),
        ("rotary_emb.inv_freq", "I64", [2], bytes(16)),
        ("x", "BOOL", [3], bytes(3)),
        ("y", "F8_E4M3", [2, 2], bytes(4)),
    ]))
    put("safetensors_header", "unpadded", st([("model.norm.weight", "F32", [2], f32(2))],
                                             pad=False))
    full = st([("model.layers.0.self_attn.q_proj.weight", "F32", [4, 2], f32(8))])
    put("safetensors_header", "truncated", full[:-5])
    put("safetensors_header", "bad-offsets", full.replace(b"[0,32]", b"[4,36]"))


# ---- merge_config ------------------------------------------------------------------------

def config_seeds():
    src = open(os.path.join(ROOT, "src", "merge", "config.rs"), encoding="utf-8").read()
    n = 0
    for text in re.findall(r'r#"(.*?)"#', src, re.S):
        if "{}" in text or len(text) < 20:
            continue
        kind = "yaml" if ("merge_method" in text or "models:" in text) else "toml"
        if kind == "toml" and "method" not in text:
            continue
        text = "\n".join(line.removeprefix("//! ") for line in text.splitlines()) + "\n"
        put("merge_config", f"{n:02}.{kind}", text)
        n += 1
        if n >= 30:
            break
    for name, text in EXTRA_CONFIGS.items():
        put("merge_config", name, text)


EXTRA_CONFIGS = {
    "slerp.yaml": """merge_method: slerp
base_model: a
models:
  - model: b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "della-anchors.yaml": """merge_method: della_linear
base_model: &b base.gguf
models:
  - model: *b
  - model: x
    parameters: &p {weight: 0.5, density: 0.6, epsilon: 0.1}
  - model: y
    parameters:
      <<: *p
      weight: !!float 1e-3
parameters: {lambda: 1.1, normalize: true, rescale: false, int8_mask: true}
tokenizer_source: base
""",
    "breadcrumbs.yaml": "merge_method: breadcrumbs_ties\nbase_model: a\nmodels: [{model: b, "
                        "parameters: {weight: [1, 0.5], density: 0.9, gamma: 0.01}}, "
                        "{model: c, parameters: {weight: 0.3}}]\n",
    "linear.toml": """method = "linear"
models = [{ path = "a.gguf", weight = 0.5 }, { path = "b.gguf", weight = 0.5 }]
parameters = { normalize = true }
""",
    "della.toml": """method = "della"
base = "b.gguf"
seed = 9223372036854775807
[parameters]
epsilon = 0.1
density = [{ filter = "*", value = [0.3, 0.9] }]
[[models]]
path = "m.gguf"
weight = -1e308
[[models]]
path = "n.gguf"
weight = 1e-308
""",
}


def main():
    gguf_seeds()
    pack_seeds()
    safetensors_seeds()
    config_seeds()
    for t in sorted(os.listdir(os.path.join(FUZZ, "corpus"))):
        files = os.listdir(os.path.join(FUZZ, "corpus", t))
        print(f"{t}: {len(files)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
