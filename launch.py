"""A checkout's launcher: `python launch.py --config=configs/<method>.py:<preset> ...`.

The same program as the installed `fewshot-jax` command (fewshot_jax/main.py).
"""

from fewshot_jax import main

if __name__ == "__main__":
  main.run()
