"""The one module that reaches into JAX's private `jax._src`, and what happens when it changes.

Why: the watchdog's heartbeat and its "a peer ended the run" notice need a
key-value store every process can reach. JAX's coordination service has one,
but no public API exposes it (jax.distributed only initializes and shuts
down), so we take the client that `jax.distributed.initialize` made from
`jax._src.distributed.global_state.client` (present from jax 0.4 to 0.10.2 at
least). A private name can change in any release: then `coordination_client`
returns None with one log line, and a multi-process run keeps JAX's own
heartbeat and abort (slower, with JAX's message instead of our one line).
"""

from absl import logging

# The client methods the watchdog calls.
NEEDED = ("key_value_set", "key_value_dir_get", "key_value_try_get")


def _private_client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def coordination_client(find=None):
  """The coordination service's key-value client, or None (with one log line) where this JAX's
  private layout differs from what we know or jax.distributed was not initialized."""
  try:
    client = (find or _private_client)()
  except (ImportError, AttributeError) as e:
    client, why = None, f"jax._src.distributed.global_state.client is not there ({e})"
  else:
    missing = [m for m in NEEDED if not hasattr(client, m)] if client is not None else list(NEEDED)
    why = (f"JAX's coordination client lacks {', '.join(missing)}" if client is not None
           else "jax.distributed has no coordination client")
    if not missing:
      return client
  import jax  # pylint: disable=g-import-not-at-top
  logging.warning("one-line failure on a lost peer is off (%s, jax %s): JAX's own heartbeat (about 100 s) and "
                  "abort apply instead", why, jax.__version__)
  return None
