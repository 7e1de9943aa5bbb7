#!/usr/bin/env python3
"""Full fine-tuning of a Gemma 3 GGUF (F32) outside llama.cpp, in JAX on the CPU.

Why this exists: ggml has no backward pass for GEGLU, so llama.cpp's training API
(`ggmerge finetune`) aborts on Gemma. This script trains the Gemma "facts experts" of
docs/results.md (experiment 6) the way `ggmerge finetune` trains SmolLM2's, and writes each as
an F32 GGUF homologous to the base: the base file copied byte for byte, each trained tensor's
bytes overwritten at its data offset (same metadata, tensor names, order, layout).

What it reproduces of `ggmerge finetune` (src/runtime/train.rs, itself llama.cpp's
finetune.cpp): the token ids come from llama.cpp's tokenizer (`experiments tokens`, BOS first);
windows of --ctx tokens every --stride tokens, `(n_tokens - ctx - 1) // stride` of them, labels
shifted by one, in file order, one window per optimizer step; next-token cross-entropy averaged
over every position of the window; AdamW as ggml implements it (β1 0.9, β2 0.999, ε 1e-8
outside the square root, bias correction, decoupled weight decay); the learning rate decays
exponentially epoch by epoch from --lr to --lr-min; every weight is trained except
token_embd.weight (frozen, as llama.cpp leaves it; Gemma's output layer is the same tensor).
Nothing is random (no dropout, no shuffling), so a run is deterministic for a given machine and
thread count; --seed is recorded only.

The forward pass is Gemma 3 as llama.cpp's graph computes it (src/models/gemma3.cpp):
embeddings scaled by sqrt(n_embd); RMSNorm (the GGUF's norm weights already include Gemma's +1);
per layer: pre-attention norm, Q/K/V projections, RMSNorm of each Q and K head, NeoX RoPE with
base `rope.freq_base` on global layers and `rope.freq_base_swa` (llama.cpp's default 10000 when
the key is absent) on sliding-window layers (the pattern: every 6th layer global), the scores
scaled by 1/sqrt(key_length), GQA (n_head / n_head_kv query heads per K/V head), causal mask
plus the sliding window (irrelevant for contexts shorter than the window: 512 here, ctx 256),
post-attention norm, residual, pre-FFN norm, GEGLU with tanh-GELU (gelu(gate) * up), down
projection, post-FFN norm, residual; final norm; tied output; logit soft-capping when the file
sets `final_logit_softcapping`.

`--emulate-ggml` adds what ggml's CPU kernels round (only for --ppl, to measure how close the
forward is): GELU through ggml's F16 table, K and V stored in an F16 KV cache.

Usage:
  train_gemma_expert.py --base BASE.gguf --tokens TRAIN.tokens.json --out EXPERT.gguf \\
      [--lr 1e-4 --lr-min 1e-5 --epochs 8 --ctx 256 --stride 256 --threads 2]
  train_gemma_expert.py --base BASE.gguf --ppl TEXT.tokens.json --ctx 256 [--emulate-ggml]
      # perplexity chunked like `ggmerge perplexity -c CTX` (llama-perplexity), per chunk
"""

import argparse
import json
import math
import os
import shutil
import sys
import time


def limit_threads(n):
    """At most `n` CPU threads: pins the process to `n` cores (XLA's and numpy's pools follow)."""
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, set(cpus))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the F32 Gemma 3 GGUF")
    p.add_argument("--tokens", help="training text's token ids (JSON of `experiments tokens`)")
    p.add_argument("--out", help="the expert GGUF to write")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the first epoch")
    p.add_argument("--lr-min", type=float, default=1e-5,
                   help="learning rate of the last epoch (exponential decay, epoch by epoch)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256, help="tokens per window (and --ppl chunk)")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=1, help="recorded only: nothing is random")
    p.add_argument("--threads", type=int, default=2, help="CPU cores to use")
    p.add_argument("--ppl", help="token ids (JSON) to score instead of training")
    p.add_argument("--emulate-ggml", action="store_true",
                   help="with --ppl: ggml's F16 GELU table and F16 KV cache")
    p.add_argument("--log", help="write the run's recipe and losses here (JSON)")
    a = p.parse_args()
    if a.ppl is None and (a.tokens is None or a.out is None):
        p.error("training needs --tokens and --out (or give --ppl)")
    if a.epochs < 1 or a.ctx < 4 or a.stride < 1 or a.threads < 1:
        p.error("--epochs, --stride and --threads must be positive, --ctx at least 4")
    if not (0 < a.lr_min <= a.lr):
        p.error("need 0 < --lr-min <= --lr")
    return a


# ---------------------------------------------------------------------------------------------
# The model


class Gemma3:
    """Hyperparameters and weights of a Gemma 3 GGUF (numpy views of the mmap'd file)."""

    def __init__(self, path):
        import numpy as np
        from gguf import GGUFReader, GGMLQuantizationType

        self.reader = GGUFReader(path)
        arch = self._get("general.architecture")
        if arch != "gemma3":
            raise SystemExit(f"{path}: architecture {arch!r}, expected gemma3")
        g = lambda k, d=KeyError: self._get(f"gemma3.{k}", d)
        self.n_embd = int(g("embedding_length"))
        self.n_layer = int(g("block_count"))
        self.n_head = int(g("attention.head_count"))
        self.n_head_kv = int(g("attention.head_count_kv"))
        self.head_dim = int(g("attention.key_length"))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.rope_base_swa = float(g("rope.freq_base_swa", 10000.0))
        self.window = int(g("attention.sliding_window", 0))
        pattern = int(g("attention.sliding_window_pattern", 6))
        # llama.cpp's set_swa_pattern(n, dense_first = false): layer il is a sliding-window
        # layer unless il % n == n - 1.
        self.swa = [self.window > 0 and (pattern == 0 or il % pattern < pattern - 1)
                    for il in range(self.n_layer)]
        self.softcap = float(g("final_logit_softcapping", 0.0))
        # Every tensor must be F32 (this trains and writes F32 only).
        self.tensors = {}
        self.offsets = {}
        for t in self.reader.tensors:
            if t.tensor_type != GGMLQuantizationType.F32:
                raise SystemExit(f"{path}: {t.name} is {t.tensor_type.name}; give an F32 model")
            # numpy shape = GGUF dims reversed (ne0 fastest): a 2-D weight is (out, in).
            self.tensors[t.name] = np.asarray(t.data).reshape([int(d) for d in t.shape[::-1]])
            self.offsets[t.name] = int(t.data_offset)
        self.output_name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
        bos = self._get("tokenizer.ggml.bos_token_id", None)
        self.bos = None if bos is None else int(bos)

    def _get(self, key, default=KeyError):
        f = self.reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise SystemExit(f"the GGUF has no {key}")
            return default
        return f.contents()

    def trainable(self):
        """Names of the trained tensors: all but the token embedding (and a tied output)."""
        return [n for n in self.tensors if n != "token_embd.weight"]


def build_forward(m, emulate_ggml=False):
    """Returns forward(params, embd, tokens) -> logits (T, n_vocab); `params` maps names to
    arrays (all but token_embd), `embd` is token_embd.weight."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    H, Hkv, D, E = m.n_head, m.n_head_kv, m.head_dim, m.n_embd
    G = H // Hkv
    scale = 1.0 / math.sqrt(D)

    def f16(x):
        return x.astype(jnp.float16).astype(jnp.float32)

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + m.eps) * w

    def gelu(x):
        y = 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
        if emulate_ggml:
            # ggml_vec_geglu_f32 with GGML_GELU_FP16: table lookup on the F16 input, F16 output,
            # 0 below -10 and x above 10.
            t = f16(0.5 * f16(x) * (1.0 + jnp.tanh(0.7978845608028654 * f16(x)
                                                     * (1.0 + 0.044715 * f16(x) * f16(x)))))
            y = jnp.where(x <= -10.0, 0.0, jnp.where(x >= 10.0, x, t))
        return y

    def rope_tables(T, base):
        # ggml's rope: theta_i = pos * base^(-2i/D) for i < D/2; NeoX pairs (i, i + D/2).
        inv = base ** (-np.arange(0, D // 2, dtype=np.float64) * 2.0 / D)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
        return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)

    def rope(x, cos, sin):  # x: (T, heads, D)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def forward(params, embd, tokens):
        T = tokens.shape[0]
        tables = {b: rope_tables(T, b) for b in {m.rope_base, m.rope_base_swa}}
        pos = np.arange(T)
        causal = pos[None, :] <= pos[:, None]  # (query, key)
        masks = {
            False: jnp.asarray(causal),
            True: jnp.asarray(causal & (pos[:, None] - pos[None, :] < max(m.window, 1))),
        }
        x = embd[tokens] * jnp.float32(math.sqrt(E))
        for il in range(m.n_layer):
            p = lambda n: params[f"blk.{il}.{n}.weight"]
            cos, sin = tables[m.rope_base_swa if m.swa[il] else m.rope_base]
            h = rms(x, p("attn_norm"))
            q = (h @ p("attn_q").T).reshape(T, H, D)
            k = (h @ p("attn_k").T).reshape(T, Hkv, D)
            v = (h @ p("attn_v").T).reshape(T, Hkv, D)
            q = rope(rms(q, p("attn_q_norm")), cos, sin) * scale
            k = rope(rms(k, p("attn_k_norm")), cos, sin)
            if emulate_ggml:
                k, v = f16(k), f16(v)  # the F16 KV cache
            q = q.reshape(T, Hkv, G, D)
            s = jnp.einsum("tkgd,skd->kgts", q, k)
            s = jnp.where(masks[m.swa[il]][None, None], s, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("kgts,skd->tkgd", a, v).reshape(T, H * D)
            o = rms(o @ p("attn_output").T, p("post_attention_norm"))
            x = x + o
            h = rms(x, p("ffn_norm"))
            f = gelu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)
            x = x + rms(f @ p("ffn_down").T, p("post_ffw_norm"))
        x = rms(x, params["output_norm.weight"])
        out = params[m.output_name] if m.output_name in params else embd
        logits = x @ out.T
        if m.softcap:
            logits = jnp.tanh(logits / m.softcap) * m.softcap
        return logits

    return forward


# ---------------------------------------------------------------------------------------------
# Perplexity (the forward pass checked against llama.cpp)


def perplexity(m, ids, n_ctx, emulate_ggml):
    """`ggmerge perplexity -c n_ctx` (llama-perplexity's chunking): chunks of n_ctx tokens, the
    first replaced by BOS, the second half scored. Prints and returns each chunk's perplexity."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    forward = jax.jit(build_forward(m, emulate_ggml))
    params = {n: jnp.asarray(t) for n, t in m.tensors.items() if n != "token_embd.weight"}
    embd = jnp.asarray(m.tensors["token_embd.weight"])
    n_chunk = len(ids) // n_ctx
    if n_chunk < 2:
        raise SystemExit(f"{len(ids)} tokens: need at least {2 * n_ctx}")
    first = n_ctx // 2
    total, count, chunks = 0.0, 0, []
    for i in range(n_chunk):
        chunk = np.array(ids[i * n_ctx:(i + 1) * n_ctx], dtype=np.int32)
        if m.bos is not None:
            chunk[0] = m.bos
        logits = np.asarray(forward(params, embd, jnp.asarray(chunk)), dtype=np.float64)
        nll = 0.0
        for pos in range(first, n_ctx - 1):
            row = logits[pos]
            mx = row.max()
            nll += -(row[ids[i * n_ctx + pos + 1]] - mx - math.log(np.exp(row - mx).sum()))
        scored = n_ctx - first - 1
        total, count = total + nll, count + scored
        chunks.append(math.exp(nll / scored))
        print(f"chunk {i + 1}: ppl {chunks[-1]:.6f}")
    ppl = math.exp(total / count)
    print(f"ppl {ppl:.6f} over {count} tokens ({n_chunk} chunks of {n_ctx})")
    return ppl, chunks


# ---------------------------------------------------------------------------------------------
# Training


def train(m, a):
    import jax
    import jax.numpy as jnp
    import numpy as np

    with open(a.tokens) as f:
        ids = json.load(f)["tokens"]
    ndata = max(len(ids) - a.ctx - 1, 0) // a.stride
    if ndata == 0:
        raise SystemExit(f"{len(ids)} tokens: need at least {a.ctx + 1 + a.stride}")
    data = np.array([ids[i * a.stride:i * a.stride + a.ctx] for i in range(ndata)], np.int32)
    labels = np.array([ids[i * a.stride + 1:i * a.stride + 1 + a.ctx] for i in range(ndata)],
                      np.int32)
    names = m.trainable()
    params = {n: jnp.array(m.tensors[n]) for n in names}
    embd = jnp.asarray(m.tensors["token_embd.weight"])
    forward = build_forward(m)

    def loss_fn(params, tokens, targets):
        logits = forward(params, embd, tokens)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=-1))

    b1, b2, eps = 0.9, 0.999, 1e-8

    def step(params, mom, vel, it, lr, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
        b1h = 1.0 / (1.0 - b1 ** it)
        b2h = 1.0 / (1.0 - b2 ** it)
        keep = 1.0 - lr * a.wd
        new_p, new_m, new_v = {}, {}, {}
        for n in params:
            g = grads[n]
            mm = mom[n] * b1 + g * (1.0 - b1)
            vv = vel[n] * b2 + g * g * (1.0 - b2)
            new_p[n] = params[n] * keep - lr * (mm * b1h) / (jnp.sqrt(vv * b2h) + eps)
            new_m[n], new_v[n] = mm, vv
        return new_p, new_m, new_v, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    mom = {n: jnp.zeros_like(p) for n, p in params.items()}
    vel = {n: jnp.zeros_like(p) for n, p in params.items()}
    print(f"{len(ids)} tokens, {ndata} windows of {a.ctx} (stride {a.stride}), {a.epochs} epochs, "
          f"{len(names)} trained tensors, {sum(int(np.prod(p.shape)) for p in params.values())} "
          f"parameters, {a.threads} thread(s)", flush=True)
    started = time.time()
    it = 1
    epochs = []
    for epoch in range(1, a.epochs + 1):
        t = (epoch - 1) / (a.epochs - 1) if a.epochs > 1 else 0.0
        lr = a.lr * (a.lr_min / a.lr) ** t
        t0, losses = time.time(), []
        for i in range(ndata):
            params, mom, vel, loss = step(params, mom, vel, jnp.float32(it), jnp.float32(lr),
                                          jnp.asarray(data[i]), jnp.asarray(labels[i]))
            it += 1
            losses.append(float(loss))
        secs = time.time() - t0
        epochs.append({"epoch": epoch, "lr": lr, "loss": sum(losses) / len(losses),
                       "seconds": secs})
        print(f"epoch {epoch}/{a.epochs}: lr {lr:.3g}, loss {epochs[-1]['loss']:.4f}, "
              f"{secs:.0f} s ({secs / ndata:.1f} s/step)", flush=True)
    seconds = time.time() - started

    # The expert: the base's bytes with each trained tensor overwritten in place.
    partial = a.out + ".partial"
    shutil.copyfile(a.base, partial)
    with open(partial, "r+b") as f:
        for n in names:
            v = np.asarray(params[n], dtype=np.float32)
            if v.shape != m.tensors[n].shape:
                raise SystemExit(f"{n}: shape {v.shape} != {m.tensors[n].shape}")
            f.seek(m.offsets[n])
            f.write(np.ascontiguousarray(v).tobytes())
    os.replace(partial, a.out)
    print(f"wrote {a.out} ({seconds:.0f} s of training)")
    if a.log:
        with open(a.log, "w") as f:
            json.dump({"base": a.base, "tokens": len(ids), "windows": ndata, "ctx": a.ctx,
                       "stride": a.stride, "lr": a.lr, "lr_min": a.lr_min, "epochs": a.epochs,
                       "weight_decay": a.wd, "optimizer": "AdamW (ggml's: b1 0.9, b2 0.999, "
                       "eps 1e-8)", "frozen": ["token_embd.weight"], "threads": a.threads,
                       "seed": a.seed, "seconds": seconds, "per_epoch": epochs}, f, indent=1)


def main():
    a = parse_args()
    limit_threads(a.threads)
    m = Gemma3(a.base)
    if a.ppl:
        with open(a.ppl) as f:
            ids = json.load(f)["tokens"]
        perplexity(m, ids, a.ctx, a.emulate_ggml)
    else:
        train(m, a)


if __name__ == "__main__":
    sys.exit(main())
