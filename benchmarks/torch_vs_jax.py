"""The same training step in JAX (this library) and in idiomatic PyTorch, on one machine.

Each case times one training step -- forward, backward, Adam update -- on
random inputs of the case's shapes, already in memory and identical for both
sides (NHWC for JAX, the same numbers NCHW for PyTorch). The JAX step is a
jitted `method.loss -> grad -> optax update` that takes the episode as an
argument, so it measures model compute only, not the trainer's on-device
sampling and augmentation (benchmarks/throughput.py times that). PyTorch runs
eager, with the steps of fewshot_jax/torch_reference/steps.py. Float32 both
sides; warm-up steps excluded; JAX timed with block_until_ready, PyTorch with
torch.cuda.synchronize on a GPU. Repeats alternate between the two sides and
the table reports the median over repeats of the mean ms/step.

Both run on the GPU when torch.cuda.is_available() and JAX has a GPU, on the
CPU otherwise (PyTorch with torch.set_num_threads(os.cpu_count())).

  python benchmarks/torch_vs_jax.py
  python benchmarks/torch_vs_jax.py --cases=protonet-omniglot-5w1s --steps=5 --repeats=3
  python benchmarks/torch_vs_jax.py --cases=idemenet-5w1s,idemenet-5w1s-train-e --input_size=224
  python benchmarks/torch_vs_jax.py --torch_compile --json=/tmp/t.json   # + torch.compile'd PyTorch

--torch_compile also times the PyTorch step with its network wrapped in
torch.compile (--compile_backend), where that compiles; a case where it fails
records the error instead.
"""

import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()  # as launch.py: before JAX creates its backend

from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from fewshot_jax import methods
from fewshot_jax.data import episodes
from fewshot_jax.models import layers
from fewshot_jax.torch_reference import conv4 as torch_conv4
from fewshot_jax.torch_reference import idemenet as torch_idemenet
from fewshot_jax.torch_reference import lgmnet as torch_lgmnet
from fewshot_jax.torch_reference import steps as torch_steps

# name -> (config file, preset, ways, shots, queries per class, tasks, what the row says)
CASES = {
    "protonet-omniglot-5w1s": ("protonet", "omniglot-5w1s", 5, 1, 15, 1,
                               "ProtoNet Conv-4, Omniglot 5-way 1-shot, 15 queries, 28x28x1"),
    "protonet-mini-5w5s": ("protonet", "mini-5w5s", 5, 5, 15, 1,
                           "ProtoNet Conv-4, miniImageNet 5-way 5-shot, 15 queries, 84x84x3"),
    "lgmnet-mini-5w1s": ("lgmnet", "mini-5w1s", 5, 1, 1, 32,
                         "LGM-Net, miniImageNet 5-way 1-shot, 1 query per class (5 per task), meta-batch 32"),
    "idemenet-5w1s": ("idemenet", "mini-5w1s", 5, 1, 15, 1,
                      "IDeMe-Net stage 2 (E fixed), 5-way 1-shot, 15 queries"),
    "idemenet-5w1s-train-e": ("idemenet", "mini-5w1s", 5, 1, 15, 1,
                              "IDeMe-Net stage 2 (E trained too), 5-way 1-shot, 15 queries"),
}
_DEFAULT = ["protonet-omniglot-5w1s", "protonet-mini-5w5s", "lgmnet-mini-5w1s", "idemenet-5w1s"]

flags.DEFINE_list("cases", _DEFAULT, f"Comma-separated case names; valid: {', '.join(CASES)}.")
flags.DEFINE_bool("idemenet_train_e", False, "Also time IDeMe-Net stage 2 with E trained by the "
                  "classification loss (adds idemenet-5w1s-train-e to --cases).")
flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per side (alternating JAX / PyTorch); the median is reported.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per side before timing (compilation, autotuning).")
flags.DEFINE_integer("input_size", 0, "IDeMe-Net input size; 0 = 84 on the CPU (the fast setting), 224 "
                     "(the paper's) on a GPU.")
flags.DEFINE_bool("tf32", False, "On a GPU, let both sides use TF32 for float32 matmuls / convolutions "
                  "(default: full float32 on both).")
flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "matmul_wgrad"], "JAX convolution "
                  "(model.conv_impl); auto: what the trainer picks (models/layers.py).")
flags.DEFINE_integer("seed", 0, "Seed of the random inputs and parameters.")
flags.DEFINE_integer("profile", 0, "After timing, profile this many steps per side (jax.profiler / "
                     "torch.profiler) and print where each side's time goes, by operation kind.")
flags.DEFINE_integer("profile_top", 12, "Rows of the --profile breakdown per case.")
flags.DEFINE_bool("torch_compile", False, "Also time PyTorch with the network under torch.compile.")
flags.DEFINE_string("compile_backend", "inductor", "torch.compile backend of --torch_compile ('eager': "
                    "Dynamo's tracing alone, a cheap check of the code path).")
flags.DEFINE_string("json", None, "Also write the rows here (rewritten after every case).")
FLAGS = flags.FLAGS


def load_config(method, preset):
  return config_lib.load_file(os.path.join(REPO, "configs", f"{method}.py"), preset)


def machine_line(jax_device, torch_device) -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  tdev = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
  return (f"CPU: {cpu}, {os.cpu_count()} cores | jax {jax.__version__} on {jax_device.platform} "
          f"({jax_device.device_kind}) | torch {torch.__version__} on {tdev} "
          f"({torch.get_num_threads()} threads) | {platform.system()} {platform.machine()} | "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | JAX conv_impl {FLAGS.conv_impl} "
          f"({layers.resolve_conv_impl(FLAGS.conv_impl)}; LGM-Net task convs "
          f"{'matmul_wgrad' if layers.task_conv_function(FLAGS.conv_impl) else 'xla'})")


# ----------------------------------------------------------------------------- inputs


def random_episode(rng, ways, shots, queries, tasks, shape, num_classes=64):
  """Host arrays of one meta-batch (NHWC floats, labels in class order, distinct base classes)."""
  return dict(
      support=rng.standard_normal((tasks, ways * shots) + shape, dtype=np.float32),
      support_labels=np.tile(np.repeat(np.arange(ways, dtype=np.int32), shots), (tasks, 1)),
      query=rng.standard_normal((tasks, ways * queries) + shape, dtype=np.float32),
      query_labels=np.tile(np.repeat(np.arange(ways, dtype=np.int32), queries), (tasks, 1)),
      classes=np.stack([rng.choice(num_classes, ways, replace=False) for _ in range(tasks)]).astype(np.int32))


def jax_episode(host, device):
  return jax.device_put(episodes.Episode(**host), device)


def torch_episode(host, device):
  """Same numbers, images NCHW, labels int64."""
  out = {}
  for k, v in host.items():
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, -3) if v.ndim == 5 else v))
    out[k] = t.to(device=device, dtype=torch.int64 if v.dtype == np.int32 else torch.float32)
  return out


# ----------------------------------------------------------------------------- JAX side


def make_jax_step(method, tx, stateful: bool):
  """jit(carry, fixed_state, episode) -> (carry, loss); carry = (params, bn_state, opt_state, key).

  stateful: the loss updates the model state (train-mode BatchNorm), which is
  then carried; otherwise the state is a constant argument (not copied per step).
  """

  def step(carry, fixed_state, episode):
    params, state, opt_state, key = carry
    key, sub = jax.random.split(key)
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (_, new_state)), grads = grad_fn(params, state if stateful else fixed_state, episode, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, new_state if stateful else None, opt_state, key), loss

  return jax.jit(step, donate_argnums=0)


def jax_case(name, host, device, conv_impl):
  """-> (step, carry, fixed_state, episode) ready to call."""
  method_name, preset, ways, shots, queries, tasks, _ = CASES[name]
  c = load_config(method_name, preset)
  c.model.conv_impl = conv_impl
  c.episode.update(ways=ways, shots=shots, queries=queries, tasks=tasks, train_ways=0)
  if method_name == "idemenet":
    c.data.input_size = FLAGS.input_size
    c.method.update(fix_embedding=not name.endswith("train-e"), cls_start_step=0)
  method = methods.build(c)
  if method_name == "idemenet":
    tx = method.optimizer(c)  # per-group Adam (D, scale; E and fc when trained), as the trainer
  else:
    tx = optax.adam(c.train.lr)
  episode = jax_episode(host, device)
  key = jax.random.key(FLAGS.seed)
  variables = jax.jit(method.init)(key, episode)
  params = variables.pop("params")
  state = dict(variables)
  if method_name == "idemenet":
    mc = c.method
    rng = np.random.default_rng(FLAGS.seed + 1)
    n = mc.gallery_per_class * mc.num_classes
    state["gallery"] = {
        "images": rng.integers(0, 256, (n, c.data.image_size, c.data.image_size, 3), dtype=np.uint8),
        "labels": np.repeat(np.arange(mc.num_classes, dtype=np.int32), mc.gallery_per_class),
        "features": np.abs(rng.standard_normal((n, 512), dtype=np.float32))}
  params, state = jax.device_put((params, state), device)
  stateful = method_name != "idemenet"  # IDeMe-Net stage 2: BatchNorm frozen, state constant
  # Everything committed to `device`, as the step's outputs are: an uncommitted leaf would make
  # the second call (on the first call's outputs) compile again.
  carry = jax.device_put((params, state if stateful else None, tx.init(params), jax.random.fold_in(key, 1)),
                         device)
  return make_jax_step(method, tx, stateful), carry, (None if stateful else state), episode, c


# ----------------------------------------------------------------------------- PyTorch side


def torch_case(name, host, device, c, jax_state, compiled=False):
  """-> a zero-argument callable running one PyTorch training step (`compiled`: the network under
  torch.compile; the optimiser and step logic stay eager)."""
  method_name, _, ways, _, _, _, _ = CASES[name]
  ep = torch_episode(host, device)
  wrap = (lambda m: torch.compile(m, backend=FLAGS.compile_backend)) if compiled else (lambda m: m)
  if method_name == "protonet":
    model = torch_conv4.Conv4(in_channels=host["support"].shape[-1], features=c.model.features).to(device)
    model = wrap(model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=c.train.lr)
    return lambda: torch_steps.protonet_step(model, opt, ep["support"], ep["support_labels"], ep["query"],
                                             ep["query_labels"], ways)
  if method_name == "lgmnet":
    model = torch_lgmnet.LGMNet.from_config(c, in_channels=host["support"].shape[-1]).to(device)
    model.train()  # train-mode (intertask) BatchNorm, as the JAX loss
    model = wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=c.train.lr)
    return lambda: torch_steps.lgmnet_step(model, opt, ep["support"], ep["support_labels"], ep["query"],
                                           ep["query_labels"], ways)
  if method_name == "idemenet":
    mc = c.method
    net = torch_idemenet.GNet(mc.grid, mc.num_classes,
                              torch_idemenet.weight_features(FLAGS.input_size)).to(device)
    gallery = jax_state["gallery"]
    images = torch.from_numpy(np.array(gallery["images"]).transpose(0, 3, 1, 2).copy()).to(device)
    features = torch.from_numpy(np.array(gallery["features"])).to(device)
    trainer = torch_steps.IDeMeNetStage2(
        wrap(net), images, features, mean=tuple(c.data.mean), std=tuple(c.data.std), input_size=FLAGS.input_size,
        augnum=mc.augnum, choose_num=mc.choose_num, probe_flip=mc.probe_flip,
        train_embedding=not mc.fix_embedding, lr_deformation=mc.lr_deformation, lr_scale=mc.lr_scale,
        lr_embedding=mc.lr_embedding, lr_fc=mc.lr_fc)
    # One task per step (tasks=1), as the reference trains.
    return lambda: trainer.step(ep["support"][0], ep["support_labels"][0], ep["query"][0],
                                ep["query_labels"][0], ep["classes"][0])
  raise ValueError(name)


# ----------------------------------------------------------------------------- timing


def time_case(name, jax_device, torch_device, conv_impl):
  _, _, ways, shots, queries, tasks, _ = CASES[name]
  method_name = CASES[name][0]
  c0 = load_config(method_name, CASES[name][1])
  if method_name == "idemenet":
    shape = (FLAGS.input_size, FLAGS.input_size, 3)
  else:
    shape = (c0.data.image_size, c0.data.image_size, 1 if c0.data.name == "omniglot" else 3)
  host = random_episode(np.random.default_rng(FLAGS.seed), ways, shots, queries, tasks, shape)

  step, carry, fixed, episode, c = jax_case(name, host, jax_device, conv_impl)
  torch.manual_seed(FLAGS.seed)
  torch_step = torch_case(name, host, torch_device, c, fixed)
  sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)

  holder = {"carry": carry}

  def run_jax(n):
    carry, loss = holder["carry"], None
    for _ in range(n):
      carry, loss = step(carry, fixed, episode)
    jax.block_until_ready((carry, loss))
    holder["carry"] = carry
    return float(loss)

  def run_torch(n):
    loss = None
    for _ in range(n):
      loss = torch_step()
    sync()
    return float(loss)

  t0 = time.perf_counter()
  jax_loss = run_jax(max(1, FLAGS.warmup))
  jax_warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  torch_loss = run_torch(max(1, FLAGS.warmup))
  torch_warm = time.perf_counter() - t0
  if not (np.isfinite(jax_loss) and np.isfinite(torch_loss)):
    raise FloatingPointError(f"{name}: non-finite warm-up loss (jax {jax_loss}, torch {torch_loss})")
  jax_ms, torch_ms = [], []
  for _ in range(FLAGS.repeats):
    for run, out in ((run_jax, jax_ms), (run_torch, torch_ms)):
      t0 = time.perf_counter()
      run(FLAGS.steps)
      out.append(1000 * (time.perf_counter() - t0) / FLAGS.steps)
  if FLAGS.profile:
    jax_totals, holder["carry"] = profile_jax(step, holder["carry"], fixed, episode, FLAGS.profile)
    print_profile(name, jax_totals, profile_torch(torch_step, FLAGS.profile), FLAGS.profile_top)
  compiled = time_torch_compiled(name, host, torch_device, c, fixed) if FLAGS.torch_compile else {}
  return dict(**compiled,name=name, what=CASES[name][6] + (f", {FLAGS.input_size}x{FLAGS.input_size}x3, augnum "
                                                f"{c.method.augnum}, chooseNum {c.method.choose_num}, "
                                                f"gallery {c.method.num_classes}x{c.method.gallery_per_class}"
                                                if method_name == "idemenet" else ""),
              jax=statistics.median(jax_ms), torch=statistics.median(torch_ms), jax_all=jax_ms,
              torch_all=torch_ms, jax_warm=jax_warm, torch_warm=torch_warm)


def time_torch_compiled(name, host, torch_device, c, jax_state) -> dict:
  """{'torch_compile': median ms/step, 'torch_compile_warm': s} of the step with the network under
  torch.compile, or {'torch_compile_error': why} where it does not compile or run."""
  try:
    torch.manual_seed(FLAGS.seed)
    step = torch_case(name, host, torch_device, c, jax_state, compiled=True)
    sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(1, FLAGS.warmup)):
      step()
    sync()
    warm = time.perf_counter() - t0
    ms = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      for _ in range(FLAGS.steps):
        step()
      sync()
      ms.append(1000 * (time.perf_counter() - t0) / FLAGS.steps)
    return {"torch_compile": statistics.median(ms), "torch_compile_warm": warm,
            "torch_compile_backend": FLAGS.compile_backend}
  except Exception as e:  # pylint: disable=broad-except  (recorded: "where it works")
    return {"torch_compile_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


# ----------------------------------------------------------------------------- profiles


def _jax_op_kinds(compiled_text: str) -> dict:
  """HLO instruction name -> kind, from the compiled module: what the instruction (or the fused
  computation it calls) computes -- convolution, dot, pooling window, reduce, transpose/copy,
  elementwise -- and the pass, 'bwd' when its metadata says it comes from a transpose (the
  backward pass), 'fwd' when it does not, '?' when XLA made it without metadata."""
  import re  # pylint: disable=g-import-not-at-top
  head = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
  inst = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w-]*)\(")
  computations, current, rows = {}, None, []
  for line in compiled_text.splitlines():
    m = inst.match(line)
    if m and current is not None:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      meta = re.search(r'op_name="([^"]*)"', line)
      computations[current].add(m.group(2))
      rows.append((m.group(1), m.group(2), meta.group(1) if meta else "", calls.group(1) if calls else None))
      continue
    m = head.match(line)
    if m and "=" not in line:
      current = m.group(1)
      computations[current] = set()
  kinds = {}
  for name, opcode, meta, calls in rows:
    ops = computations.get(calls, set()) if calls else {opcode}
    if "convolution" in ops:
      kind = "convolution"
    elif "dot" in ops:
      kind = "dot"
    elif ops & {"reduce-window", "select-and-scatter"}:
      kind = "pooling window"
    elif "reduce" in ops:
      kind = "reduce"
    elif ops <= {"transpose", "copy", "parameter", "bitcast", "reshape", "slice", "concatenate", "pad"}:
      kind = "transpose / copy / slice"
    else:
      kind = "elementwise"
    kinds[name] = f"{kind} ({'bwd' if 'transpose(' in meta else 'fwd' if meta else '?'})"
  return kinds


def profile_jax(step, carry, fixed, episode, steps: int):
  """({kind: ms per step}, carry) of the JAX step, from jax.profiler's per-thunk events on the
  host plane; the carry is the stepped one (the step donates its input)."""
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  kinds = _jax_op_kinds(step.lower(carry, fixed, episode).compile().as_text())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      carry, loss = step(carry, fixed, episode)
    jax.block_until_ready((carry, loss))
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[-1])
  totals = {}
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op:
          kind = kinds.get(op, op)
          totals[kind] = totals.get(kind, 0.0) + event.duration_ns / 1e6 / steps
  return totals, carry


def profile_torch(torch_step, steps: int) -> dict:
  """{aten op: self ms per step} of the PyTorch step (torch.profiler, self CPU / CUDA time)."""
  from torch import profiler as tp  # pylint: disable=g-import-not-at-top
  activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
  with tp.profile(activities=activities) as prof:
    for _ in range(steps):
      torch_step()
    if torch.cuda.is_available():
      torch.cuda.synchronize()
  totals = {}
  for e in prof.key_averages():
    ms = (getattr(e, "self_device_time_total", 0) or e.self_cpu_time_total) / 1e3 / steps
    totals[e.key] = totals.get(e.key, 0.0) + ms
  return totals


def print_profile(what: str, jax_totals: dict, torch_totals: dict, top: int):
  """The two breakdowns side by side, largest first."""
  jt, tt = sum(jax_totals.values()), sum(torch_totals.values())
  j = sorted(jax_totals.items(), key=lambda kv: -kv[1])[:top]
  t = sorted(torch_totals.items(), key=lambda kv: -kv[1])[:top]
  print(f"\n{what}: where one step's time goes, under the profilers (ms/step and share of the side's "
        f"total; JAX: XLA thunks by what they compute, total {jt:.1f}; PyTorch: self time by aten op, "
        f"total {tt:.1f}; totals differ from the step time: work overlapping on threads adds up, and "
        f"time no event covers -- XLA:CPU's asynchronous thunks -- is missing)\n")
  print("| JAX thunks (pass) | ms | % | PyTorch op | ms | % |")
  print("|---|---:|---:|---|---:|---:|")
  cell = lambda kv, total: ("", "", "") if kv is None else (kv[0], f"{kv[1]:.1f}", f"{100 * kv[1] / total:.0f}")
  for i in range(max(len(j), len(t))):
    a = cell(j[i] if i < len(j) else None, jt)
    b = cell(t[i] if i < len(t) else None, tt)
    print("| " + " | ".join(a + b) + " |")


def main(argv):
  del argv
  cases = list(FLAGS.cases) + (["idemenet-5w1s-train-e"] if FLAGS.idemenet_train_e else [])
  cases = list(dict.fromkeys(cases))
  unknown = [n for n in cases if n not in CASES]
  if unknown:
    raise app.UsageError(f"unknown --cases {unknown}; valid: {list(CASES)}")
  on_gpu = torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
  jax_device = jax.devices("gpu")[0] if on_gpu else jax.devices("cpu")[0]
  torch_device = torch.device("cuda") if on_gpu else torch.device("cpu")
  torch.set_num_threads(os.cpu_count())
  if on_gpu:
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels (warm-up)
    torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    torch.backends.cudnn.allow_tf32 = FLAGS.tf32
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if FLAGS.tf32 else "highest")
  conv_impl = FLAGS.conv_impl  # 'auto': model.conv_impl's own choice for this backend and XLA_FLAGS
  if not FLAGS.input_size:
    FLAGS.input_size = 224 if on_gpu else 84
  print(machine_line(jax_device, torch_device), flush=True)
  rows = []
  with jax.default_device(jax_device):
    for name in cases:
      r = time_case(name, jax_device, torch_device, conv_impl)
      rows.append(r)
      print(f"  {name}: JAX {r['jax']:.1f} ms/step {[round(x, 1) for x in r['jax_all']]} (warm-up "
            f"{r['jax_warm']:.1f} s) | PyTorch {r['torch']:.1f} ms/step {[round(x, 1) for x in r['torch_all']]} "
            f"(warm-up {r['torch_warm']:.1f} s)" + (f" | torch.compile {r['torch_compile']:.1f} ms/step" if
                                                    "torch_compile" in r else ""), flush=True)
      if FLAGS.json:
        with open(FLAGS.json, "w") as f:
          json.dump({"machine": machine_line(jax_device, torch_device), "on_gpu": on_gpu, "tf32": FLAGS.tf32,
                     "rows": rows}, f, indent=2)
  precision = "TF32 allowed" if FLAGS.tf32 else "full float32"
  print(f"\nTraining step (forward + backward + Adam update), ms/step, median of {FLAGS.repeats} repeats x "
        f"{FLAGS.steps} steps after {FLAGS.warmup} warm-up steps; both sides on "
        f"{'the GPU (' + precision + ')' if on_gpu else 'the CPU'}, float32, the same random inputs "
        "already in memory. JAX: a jitted method.loss -> grad -> optax Adam update taking the episode as "
        "an argument (model compute only; not the trainer's on-device sampling + augmentation scan). "
        "PyTorch: eager, fewshot_jax/torch_reference/steps.py.\n")
  compile_col = FLAGS.torch_compile
  print("| case | JAX ms/step | PyTorch ms/step | PyTorch/JAX |" + (" torch.compile ms/step |" if compile_col else ""))
  print("|---|---:|---:|---:|" + ("---:|" if compile_col else ""))
  for r in rows:
    extra = (f" {r['torch_compile']:.1f} |" if "torch_compile" in r else " failed |") if compile_col else ""
    print(f"| {r['what']} | {r['jax']:.1f} | {r['torch']:.1f} | {r['torch'] / r['jax']:.2f} |{extra}")
  print(f"\n{machine_line(jax_device, torch_device)}")


if __name__ == "__main__":
  app.run(main)
