"""Every test sees 8 fake CPU devices, so sharding is exercised on real 8-device and 2x4 meshes.

The flags must be set before jax is imported anywhere, hence at the top of conftest. Tests write only under
temporary folders: the caches that default to the user's home (analogjax's token cache, Hugging Face's, matplotlib's)
point into one temporary folder for the session, and subprocesses inherit it.
"""

import atexit
import os
import shutil
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="analogjax-test-cache-")
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
for _var, _sub in (("XDG_CACHE_HOME", "xdg"), ("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl")):
    os.environ[_var] = os.path.join(_CACHE_ROOT, _sub)

# Compiled programs persist for the session (and the CLI subprocesses tests start): many tests compile the same tiny
# steps, and compiling, not running, is most of the suite's time on CPU. Results are unchanged (same programs).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE_ROOT, "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
