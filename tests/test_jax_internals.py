"""Private JAX internals live in one module, and a JAX whose private layout differs falls back to JAX's
own heartbeat and abort (one log line) instead of crashing the run."""

import re
import subprocess
import sys
import types


from fewshot_jax import jax_internals
from tests.conftest import REPO
from tests.test_multiprocess import _free_port


def test_only_one_module_imports_private_jax():
  hits = [str(p.relative_to(REPO)) for p in sorted(REPO.rglob("*.py"))
          if ".ci-venv" not in p.parts and "build" not in p.parts
          and re.search(r"(from|import) jax\._src", p.read_text())]
  assert hits == ["fewshot_jax/jax_internals.py"]


def _client(*methods):
  return types.SimpleNamespace(**{m: (lambda *a, **k: None) for m in methods})


def test_the_client_is_used_only_where_it_has_what_the_watchdog_calls(caplog):
  full = _client(*jax_internals.NEEDED)
  assert jax_internals.coordination_client(lambda: full) is full

  def gone():
    raise AttributeError("module 'jax._src.distributed' has no attribute 'global_state'")
  cases = [(gone, "is not there"), (lambda: None, "no coordination client"),
           (lambda: _client("key_value_set", "key_value_try_get"), "lacks key_value_dir_get")]
  for find, why in cases:
    caplog.clear()
    assert jax_internals.coordination_client(find) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and why in lines[0] and "one-line failure on a lost peer is off" in lines[0], lines


def test_two_processes_run_to_the_end_without_the_private_client(tmp_path):
  """The fallback forced in both processes of a pod run (as on a JAX without
  jax._src.distributed.global_state): the run trains, validates, evaluates and says once per process
  that the faster one-line failure is off."""
  forced = ("import sys\nfrom fewshot_jax import jax_internals, main\n"
            "def gone():\n  raise AttributeError('forced by the test')\n"
            "jax_internals._private_client = gone\nmain.run()\n")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-c", forced, "--distributed", f"--coordinator_address={address}", "--num_processes=2",
       f"--process_id={i}", f"--workdir={tmp_path / 'w'}", "--config=protonet:synthetic",
       "--config.train.steps=4", "--config.train.eval_every=4", "--config.eval.val_episodes=8",
       "--config.eval.episodes=16", f"--config.data.data_dir={tmp_path / 'data'}"],
      cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
  assert '"episodes": 16' in outs[0][0]
  for _, err in outs:
    assert err.count("one-line failure on a lost peer is off (jax._src.distributed.global_state.client is not "
                     "there (forced by the test)") == 1, err[-1500:]
