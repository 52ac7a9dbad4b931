"""Why a decode step with the CLS row costs more than one without it, on XLA CPU.

    python benchmarks/small_matmul.py            # SmolLM2's MLP shapes, 30 layers
    python benchmarks/small_matmul.py --smoke    # tiny shapes (CI)

A decode step multiplies M activation rows by every weight matrix once. At M = 1 XLA CPU calls a
gemv that streams the weights at close to the memory bandwidth; a CLS step has M = 2 (batch 1)
or M = 2B, and XLA's small-M matmul paths (YNNPACK fusions or Eigen) run those well below that
bandwidth, although the weights are read once either way and the extra arithmetic is small.
This times a chain of SmolLM2-shaped MLP weights (576 x 1536 and 1536 x 576 per layer, fp32,
every matrix a separate buffer, so each is read from memory as in a real step) at several M,
as the plain einsum, and as M separate one-row products (the weights are then read M times).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def chain(rows_split: bool):
  def f(x_MD, ups, downs):
    h = x_MD
    for up_DF, down_FD in zip(ups, downs):
      for w in (up_DF, down_FD):
        if rows_split:
          h = jnp.concatenate([h[i : i + 1] @ w for i in range(h.shape[0])], axis=0)
        else:
          h = h @ w
        h = jnp.tanh(h)  # keeps XLA from reassociating the chain
    return h

  return f


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="1,2,8,16")
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  D, F = (576, 1536) if not args.smoke else (32, 64)
  layers, repeats = (args.layers, args.repeats) if not args.smoke else (2, 2)
  rng = np.random.default_rng(0)
  ups = [jnp.asarray(rng.standard_normal((D, F), np.float32) * 0.02) for _ in range(layers)]
  downs = [jnp.asarray(rng.standard_normal((F, D), np.float32) * 0.02) for _ in range(layers)]
  weight_gb = 2 * layers * D * F * 4 / 1e9
  print(f"{layers} layers of {D} x {F} and {F} x {D} fp32 ({weight_gb * 1e3:.0f} MB); best of {repeats}")
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, jax {jax.__version__}")
  print("| rows M | products | ms | weight GB/s | time vs M = 1 |")
  print("|---|---|---|---|---|")
  base = None
  for m in [int(r) for r in args.rows.split(",")]:
    for split in (False, True) if m > 1 else (False,):
      x = jnp.ones((m, D), jnp.float32)
      fn = jax.jit(chain(split)).lower(x, ups, downs).compile()
      jax.block_until_ready(fn(x, ups, downs))
      best = float("inf")
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, ups, downs))
        best = min(best, time.perf_counter() - t)
      base = best if base is None else base
      kind = f"{m} one-row products" if split else "one M-row product"
      print(f"| {m} | {kind} | {best * 1e3:.2f} | {weight_gb / best:.1f} | {best / base:.2f} |")


if __name__ == "__main__":
  main()
