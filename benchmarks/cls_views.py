"""What a CLS training example costs under each recipe design (issue: the whole mixture in the CPU job).

    python benchmarks/cls_views.py            # SmolLM2-135M shapes, random weights
    python benchmarks/cls_views.py --smoke    # tiny shapes (CI)

Rows (same run, same machine; ratios against the first row, the pre-views recipe):
  shared-top4 + LM   the old main job: one SFT row of 160 tokens, the last 4 layers and the head
                     trained with the LM loss, the CLS reading query + last 15 response tokens
                     (one view per example)
  views, exit L      the views recipe (data/views.py): the tokens of prompt + reference + own
                     response run once, frozen, through the L layers the CLS reads; 5 view rows
                     (CLS side path: adapters + head) read that cache with the gradient
A views row holds the prompt and two 32-token responses (the main job's `views.response_tokens`);
T is the padded row length. Time is per *example* (prompt), so the views rows cover 5 views each.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clsalign_jax import masks, train
from clsalign_jax import model as model_lib


def _time(f, args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def sft_step(cfg, params, B: int, T: int):
  """The old recipe's gradient: top-4 layers + head, LM loss on every row, CLS window view."""
  trainable = {k: v for k, v in params.items() if k in ("cls_head", "final_norm") or k in _top(cfg, 4)}
  frozen = {k: v for k, v in params.items() if k not in trainable}
  model = model_lib.Transformer(cfg)
  tokens = jnp.ones((B, T), jnp.int32).at[:, 0].set(cfg.cls_id)
  seg = jnp.ones((B, T), jnp.int32)
  q = jnp.broadcast_to(jnp.asarray([20, 60]), (B, 2))
  r = jnp.broadcast_to(jnp.asarray([65, T]), (B, 2))
  mask = masks.cls_training_mask(seg, q, r, cls_response="window", cls_window=15)

  def loss(tr):
    out = model.apply({"params": {**tr, **frozen}}, tokens, jnp.broadcast_to(jnp.arange(T), (B, T)), mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_BTV, jnp.zeros((B, T), jnp.int32))
    return jnp.mean(ce) + jnp.mean(out.cls_logit_B)

  return jax.jit(jax.grad(loss)), (trainable,)


def _top(cfg, n):
  return {f"layers_{i}" for i in range(cfg.n_layers - n, cfg.n_layers)}


def views_step(cfg, params, B: int, T: int, prompt: int, response: int):
  model = model_lib.Transformer(cfg)
  trainable = {k: v for k, v in params.items() if k.startswith("cls_")}
  frozen = {k: v for k, v in params.items() if k not in trainable}
  branch = np.full((B, T), -1, np.int32)
  branch[:, 1:prompt] = 0
  branch[:, prompt : prompt + response] = 1
  branch[:, prompt + response : prompt + 2 * response] = 2
  positions = np.zeros((B, T), np.int32)
  positions[:, :prompt] = np.arange(prompt)
  positions[:, prompt : prompt + response] = prompt + np.arange(response)
  positions[:, prompt + response : prompt + 2 * response] = prompt + np.arange(response)
  win = np.asarray(
    [[0, 0], [prompt, prompt + 15], [prompt + 5, prompt + 20], [prompt + response, prompt + response + 15]]
  )
  win = np.concatenate([win, [[prompt + response + 10, prompt + response + 25]]])
  batch = {
    "tokens": jnp.ones((B, T), jnp.int32),
    "positions": jnp.asarray(positions),
    "branch": jnp.asarray(branch),
    "query_span": jnp.broadcast_to(jnp.asarray([20, prompt - 5]), (B, 2)),
    "view_window": jnp.broadcast_to(jnp.asarray(win), (B, 5, 2)),
    "view_query": jnp.broadcast_to(jnp.asarray([True, True, False, True, False]), (B, 5)),
  }

  def loss(tr):
    return jnp.mean(train.view_logits(model, {**tr, **frozen}, batch))

  return jax.jit(jax.grad(loss)), (trainable,)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--exits", default="30,16,10")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  if args.smoke:
    base = model_lib.ModelConfig(vocab_size=256, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    exits, repeats, (Bs, Ts, Bv, Tv, P, R) = (6, 3), 1, (2, 32, 4, 64, 16, 8)
  else:
    base = model_lib.preset("smollm2_135m", dtype="float32", param_dtype="float32", scan_layers=False)
    exits, repeats, (Bs, Ts, Bv, Tv, P, R) = (
      tuple(int(e) for e in args.exits.split(",")),
      args.repeats,
      (8, 160, 32, 128, 60, 32),
    )
  print(
    f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, jax {jax.__version__}; best of {repeats}"
  )
  print("| design | batch × T | views per example | s / step | ms / example | vs old recipe |")
  print("|---|---|---|---|---|---|")
  params = model_lib.init_params(base, jax.random.key(0))
  f, a = sft_step(base, params, Bs, Ts)
  s = _time(f, a, repeats)
  ref = s / Bs
  print(f"| shared-top4 + LM (baseline) | {Bs} × {Ts} | 1 | {s:.2f} | {1e3 * s / Bs:.0f} | 1.00 |", flush=True)
  for e in exits:
    cfg = base.replace(cls_exit_layer=e, cls_adapter_rank=64 if not args.smoke else 4)
    p = {**params, **model_lib.fresh_cls_path(cfg, jax.random.key(1))}
    f, a = views_step(cfg, p, Bv, Tv, P, R)
    s = _time(f, a, repeats)
    print(f"| views, exit {e} | {Bv} × {Tv} | 5 | {s:.2f} | {1e3 * s / Bv:.0f} | {s / Bv / ref:.2f} |", flush=True)


if __name__ == "__main__":
  main()
