"""PyTorch checkpoints <-> workdirs, for every method with a PyTorch bridge (methods/<name>_torch.py).

--mode=convert: a torch.save'd state_dict in the authors' key layout -> an orbax
checkpoint (step 0, latest and best) and config.json in a workdir, which
--mode=eval, --mode=train (resumes from step 0) and later stages read like any
other. --mode=export: the other way, so a researcher can go back to the PyTorch
code; exporting and converting back gives bit-identical variables.

Reading a file (`load_state_dict`, strict and without running pickled code) and
the key layouts live in state_dicts.py and the methods' bridges; this module
only moves whole models between files and workdirs.
"""

import os
import shutil

import jax

from fewshot_jax import checkpoint
from fewshot_jax import files
from fewshot_jax import methods
from fewshot_jax import restore
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import state_dicts
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import CheckpointError, ConfigError
from fewshot_jax.state_dicts import load_state_dict  # pylint: disable=unused-import  # the file reader, here too


def convert_to_workdir(config, torch_checkpoint: str, workdir: str, overwrite: bool = False) -> dict:
  """Converts a PyTorch checkpoint once into an orbax checkpoint in `workdir` (step 0).

  A workdir that already holds checkpoints is refused (it would describe one
  model and hold another); `overwrite` replaces them. The method's bridge reads
  the file (from_torch) and, where a converted model needs more than its
  variables (a gallery embedded from the train split), completes its state.
  'best' carries val_accuracy 0: the converted model has not been validated here.
  """
  config, mesh = sharding.setup(config)
  method = methods.build(config)
  fresh = restore.abstract_state(method, config)  # shapes only: nothing is initialised or compiled
  bridge = methods.torch_bridge(config, {"params": fresh.params, **fresh.model_state}, "convert")
  state_dict = load_state_dict(torch_checkpoint)  # first: a bad file fails before any model work
  held = [d for d in ("checkpoints", "best") if os.path.isdir(os.path.join(workdir, d)) and
          os.listdir(os.path.join(workdir, d))]
  if held and not overwrite:
    raise ConfigError(f"workdir {workdir} already holds checkpoints ({', '.join(held)}); converting into it "
                      "would leave one model described and another stored: use an empty --workdir, or "
                      "pass --overwrite to replace them")
  tx = state_lib.optimizer_for(method, config)
  variables = bridge.from_torch(state_dict, source=torch_checkpoint)
  if bridge.complete is not None:
    model_state = bridge.complete(variables, lambda: input_pipeline.load(config, config.data.train_split, mesh))
  else:
    model_state = {"batch_stats": variables["batch_stats"]}
  params = jax.tree.map(jax.numpy.asarray, variables["params"])
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  if shapes(params) != shapes(fresh.params) or shapes(model_state) != shapes(fresh.model_state):
    raise CheckpointError(f"{torch_checkpoint} converts to variables that do not fit the model of the config "
                          f"(method.name={method.name!r}); check method.* / model.* / data.input_size")
  state = state_lib.TrainState(step=jax.numpy.zeros((), fresh.step.dtype), params=params, model_state=model_state,
                               opt_state=tx.init(params))
  state = jax.device_put(state, sharding.replicated(mesh))
  os.makedirs(workdir, exist_ok=True)
  lock = files.WorkdirLock(workdir)
  lock.acquire()
  try:
    for d in held:  # overwrite: the old model goes entirely
      shutil.rmtree(os.path.join(workdir, d))
    _save_converted(config, state, workdir)
  finally:
    lock.release()
  return {"converted": torch_checkpoint, "workdir": workdir, "method": method.name,
          "parameters": int(sum(x.size for x in jax.tree.leaves(params)))}


def _save_converted(config, state, workdir) -> None:
  """Step 0 as the latest and the best checkpoint, and config.json."""
  ckpt = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
  meta = checkpoint.checkpoint_meta(config)
  ckpt.save(ckpt.latest, state, meta)
  ckpt.save(ckpt.best, state, meta, metrics={"val_accuracy": 0.0})
  ckpt.wait()
  ckpt.close()
  checkpoint.write_config(workdir, config)


def export_checkpoint(config, workdir: str, path: str) -> dict:
  """Writes the eval.checkpoint (default best) model of workdir as a PyTorch state_dict in the
  authors' key layout (the module the bridge's to_torch builds), which --mode=convert turns back
  into the same variables. Written through a temporary file and a rename: a crash never leaves a
  partial file at `path`."""
  config, mesh = sharding.setup(config)
  bridge = methods.torch_bridge(config, restore.variable_shapes(config), "export")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):  # before the checkpoint is read
    raise ConfigError(f"cannot write --torch_checkpoint={path!r}: {directory} is not a directory")
  torch = state_dicts.torch_module()
  method, state = restore.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  state_dict = bridge.to_torch(state.params, state.model_state).state_dict()
  with files.atomic_path(path) as tmp:
    torch.save(state_dict, tmp)
  return {"exported": path, "workdir": workdir, "method": method.name, "step": int(state.step),
          "checkpoint": config.eval.checkpoint, "keys": len(state_dict)}
