"""Accuracy comparison: one model, the same episodes, JAX and PyTorch.

`compare_checkpoint` restores a checkpoint, loads the very same variables into
the method's PyTorch reference (its bridge: methods/<name>_torch.py), takes the
evaluation episodes from evaluate.Evaluator under the standard protocol (so the
JAX accuracies are those of --mode=eval) and scores every prediction mode in
both frameworks on the same episode tensors. Random choices both sides must
share (sampled images, generator noise) are JAX's, handed over by the bridge's
`jax_extras`. It writes <workdir>/compare_<split>.json.

JAX runs as --mode=eval does (its default matmul precision, which on an
NVIDIA GPU is TF32 for float32; pass precision='highest' for true float32);
PyTorch runs in float32 with TF32 off, eval mode, on CUDA when torch has it.
"""

import contextlib
import os
from typing import Iterable

import jax
import ml_collections
import numpy as np

from fewshot_jax import checkpoint
from fewshot_jax import evaluate
from fewshot_jax import methods
from fewshot_jax import restore
from fewshot_jax import sharding
from fewshot_jax import state_dicts
from fewshot_jax.data import episodes as episodes_lib
from fewshot_jax.errors import ConfigError

TOLERANCE_POINTS = 0.1  # the accuracies of the two frameworks must agree to this many points


def compare_on_episodes(config: ml_collections.ConfigDict, params, state,
                        episode_batches: Iterable[episodes_lib.Episode], key, num_episodes: int | None = None,
                        precision: str | None = None, chunk: int = 64, return_logits: bool = False) -> dict:
  """Scores every prediction mode in JAX and PyTorch on the same episodes.

  `episode_batches` yields Episode batches of T tasks; the batch starting at
  episode `start` is predicted with keys fold_in(key, start + t) for its tasks t, as
  Evaluator does with its predict key. Stops after `num_episodes` episodes (the last batch is run
  whole in JAX, so the random choices do not depend on the cut).

  Returns {mode: {"jax": [E] accuracies, "torch": [E] accuracies,
  "agreement": [E] fraction of queries with the same argmax,
  "logit_rel_diff": [E] max |jax - torch| / max |torch| of the episode's logits}}
  (and "jax_logits" / "torch_logits" [E, Q, N] when return_logits).
  """
  method = methods.build(config)
  bridge = methods.torch_bridge(config, {"params": params, **state}, "compare")

  @jax.jit
  def side(params, state, episode, keys):
    extras = None if bridge.jax_extras is None else bridge.jax_extras(params, state, episode, keys)
    return method.modes(params, state, episode, keys), extras

  device = state_dicts.torch_device()
  net = bridge.to_torch(params, state).to(device)
  parts, start = [], 0
  for episode in episode_batches:
    if num_episodes is not None and start >= num_episodes:
      break
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      keys = evaluate.indexed_keys(key, start, episode.support.shape[0])
      logits, extras = jax.device_get(side(params, state, episode, keys))
    ep = jax.device_get({"support": episode.support, "support_labels": episode.support_labels,
                         "query": episode.query, "query_labels": episode.query_labels})
    t = ep["support"].shape[0]
    keep = t if num_episodes is None else min(t, num_episodes - start)
    ep = {k: v[:keep] for k, v in ep.items()}
    ep["ways"] = int(episode.classes.shape[1])
    extras = jax.tree.map(lambda x: x[:keep], extras)  # task-major, as the episode
    torch_logits = bridge.logits(net, ep, extras, device, chunk)
    labels = ep["query_labels"]
    part = {}
    for mode, jl in logits.items():
      jl = np.asarray(jl[:keep], np.float32)
      tl = torch_logits[mode].numpy()
      jp, tp = jl.argmax(-1), tl.argmax(-1)
      part[mode] = {"jax": (jp == labels).mean(-1), "torch": (tp == labels).mean(-1),
                    "agreement": (jp == tp).mean(-1),
                    "logit_rel_diff": np.abs(jl - tl).max((1, 2)) / np.maximum(np.abs(tl).max((1, 2)), 1e-30)}
      if return_logits:
        part[mode].update(jax_logits=jl, torch_logits=tl)
    parts.append(part)
    start += t
  if not parts:
    raise ConfigError("no episodes to compare")
  return {mode: {k: np.concatenate([p[mode][k] for p in parts]) for k in parts[0][mode]} for mode in parts[0]}


def standard_episode_batches(config: ml_collections.ConfigDict, dataset, num_episodes: int):
  """(batches, predict key): evaluate.Evaluator's standard-protocol episodes of `dataset`, eval.tasks
  at a time, for comparing variables that are not in a workdir (tests, notebooks)."""
  sample_key, predict_key = evaluate.episode_keys(config)
  sampling = evaluate.standard_sampling(config)
  sample = jax.jit(lambda ds, start: evaluate.sample_batch(sample_key, ds, start, config.eval.tasks, **sampling))
  return (sample(dataset, start) for start in range(0, num_episodes, config.eval.tasks)), predict_key


def summarize_comparison(per_mode: dict) -> dict:
  """Per-episode arrays of compare_on_episodes -> the JSON summary (accuracies in percent)."""
  modes = {}
  for mode, r in per_mode.items():
    jax_s, torch_s = evaluate.summarize(r["jax"]), evaluate.summarize(r["torch"])
    diff = abs(jax_s["accuracy"] - torch_s["accuracy"])
    modes[mode] = {"jax": {"accuracy": jax_s["accuracy"], "ci95": jax_s["ci95"]},
                   "torch": {"accuracy": torch_s["accuracy"], "ci95": torch_s["ci95"]},
                   "difference": diff,
                   "prediction_agreement": float(np.mean(r["agreement"])),
                   "max_logit_rel_diff": float(np.max(r["logit_rel_diff"])),
                   "within_tolerance": bool(diff <= TOLERANCE_POINTS)}
  return modes


def compare_checkpoint(config: ml_collections.ConfigDict, workdir: str, episodes: int | None = None,
                       precision: str | None = None) -> dict:
  """Scores the eval.checkpoint (default best) checkpoint of workdir in JAX and PyTorch on the
  first `episodes` (default eval.episodes) standard-protocol episodes of eval.split.

  Returns {"episodes": E, "modes": {mode: {"jax": {accuracy, ci95}, "torch": {accuracy, ci95},
  "difference": |jax - torch| in points, "prediction_agreement": fraction of queries with the
  same argmax, "max_logit_rel_diff", "within_tolerance"}}, "per_episode": {mode: {"jax": [E],
  "torch": [E]}} (fractions), ...} and writes it to <workdir>/compare_<split>.json.
  `precision` (e.g. 'highest') runs the JAX side under jax.default_matmul_precision; None
  keeps --mode=eval's numbers.
  """
  config, mesh = sharding.setup(config)
  methods.torch_bridge(config, restore.variable_shapes(config), "compare")  # before any work
  num = config.eval.episodes if episodes is None else episodes
  if not isinstance(num, int) or isinstance(num, bool) or num < 1:
    raise ConfigError(f"the number of episodes to compare must be a positive integer, not {num!r}")
  method, state = restore.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  split = config.eval.split
  # The Evaluator loads the split, checks that the episodes fit it and samples them.
  evaluator = evaluate.Evaluator(method, config, mesh, split, num, protocol="standard")
  batches = (episode for _, episode in evaluator.episode_batches())
  per_mode = compare_on_episodes(config, state.params, state.model_state, batches, evaluator.predict_key,
                                 num_episodes=num, precision=precision)
  result = {"method": method.name, "dataset": config.data.name, "split": split, "ways": config.episode.ways,
            "shots": config.episode.shots, "protocol": "standard", "step": int(state.step),
            "checkpoint": config.eval.checkpoint, "episodes": num,
            "queries_per_episode": config.eval.queries * config.episode.ways,
            "default_mode": method.checkpoint_mode(config),
            "jax_backend": jax.default_backend(), "jax_precision": precision or "default",
            "torch_device": str(state_dicts.torch_device()), "tolerance_points": TOLERANCE_POINTS,
            "modes": summarize_comparison(per_mode),
            "per_episode": {mode: {"jax": r["jax"].tolist(), "torch": r["torch"].tolist()}
                            for mode, r in per_mode.items()}}
  checkpoint.write_json(os.path.join(workdir, f"compare_{split}.json"), result)
  return result


def format_table(result: dict) -> str:
  """Markdown table of a compare_checkpoint result."""
  head = (f"{result.get('method', '?')} on {result.get('episodes', '?')} {result.get('split', '')} episodes"
          f" ({result.get('ways', '?')}-way {result.get('shots', '?')}-shot, step {result.get('step', '?')};"
          f" JAX on {result.get('jax_backend', '?')}, PyTorch on {result.get('torch_device', '?')})")
  lines = [head, "", "| mode | JAX accuracy (%) | PyTorch accuracy (%) | difference (points) | prediction agreement |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for mode, m in result["modes"].items():
    lines.append(f"| {mode} | {m['jax']['accuracy']:.2f} ± {m['jax']['ci95']:.2f} "
                 f"| {m['torch']['accuracy']:.2f} ± {m['torch']['ci95']:.2f} | {m['difference']:.3f} "
                 f"| {100 * m['prediction_agreement']:.2f}% |")
  return "\n".join(lines)
