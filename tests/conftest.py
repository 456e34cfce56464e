"""Every test sees 8 fake CPU devices, so sharding is exercised on real 8-device and 2x4 meshes.

The flags must be set before jax is imported anywhere, hence at the top of conftest. Tests write only under
temporary folders: the caches that default to the user's home (analogjax's token cache, Hugging Face's, matplotlib's)
point into one temporary folder for the session, and subprocesses inherit it.
"""

import atexit
import os
import shutil
import tempfile

from analogjax.runtime.xla_flags import add_cpu_flags

# pytest-xdist workers inherit the controller's environment: they reuse its root (so a program one worker compiled
# is a cache hit in the other), and only the process that made the root removes it.
_CACHE_ROOT = os.environ.get("ANALOGJAX_TEST_CACHE_ROOT", "")
if not os.path.isdir(_CACHE_ROOT):
    _CACHE_ROOT = tempfile.mkdtemp(prefix="analogjax-test-cache-")
    os.environ["ANALOGJAX_TEST_CACHE_ROOT"] = _CACHE_ROOT
    atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
for _var, _sub in (("XDG_CACHE_HOME", "xdg"), ("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl")):
    os.environ[_var] = os.path.join(_CACHE_ROOT, _sub)

# Compiled programs persist for the session (both xdist workers and the CLI subprocesses tests start share them):
# many tests compile the same tiny steps, and compiling, not running, is most of the suite's time on CPU. Results are
# unchanged (same programs).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE_ROOT, "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
# The tests' programs are tiny and compiled once or twice each: compiling, not running, is their cost, and most of a
# CPU compile is LLVM optimising machine code. The tests run the same HLO programs with LLVM's cheapest settings (the
# suite: 1,038 s -> 825 s on 2 cores). Results may differ from an optimised build in the last bits (vectorised sums),
# so every analogjax process a test starts gets these same flags (subprocess_env.cpu_env): comparisons across
# processes stay bit for bit. Benchmarks and the demo keep XLA's default optimisation.
_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
_FLAGS_GIVEN = os.environ.get("XLA_FLAGS", "").split()  # an xdist worker inherits the controller's: added once
os.environ["XLA_FLAGS"] = " ".join([*_FLAGS_GIVEN, *(f for f in _TEST_XLA_FLAGS if f not in _FLAGS_GIVEN)])
add_cpu_flags()  # and the settings every analogjax CLI process adds for itself, so tests run what users run
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


# The slowest files, slowest first (CPU seconds measured on 2 cores). Under `-n 2 --dist loadfile` pytest-xdist hands
# whole files to its two workers in collection order: the long files start first and the many short ones fill in at
# the end, so both workers finish together. (A file not named here runs after these, in its usual order.) The
# notebook, test_release and test_demo run one toy demo: the notebook, first, compiles what the other two reuse.
SLOWEST_FIRST = (
    "test_bad_input.py",
    "test_step.py",
    "test_prune.py",
    "test_distributed.py",
    "test_notebook.py",
    "test_cli.py",
    "test_model.py",
    "test_gguf.py",
    "test_checkpoint_resume.py",
    "test_moe.py",
    "test_context_parallel.py",
    "test_hf_moe.py",
    "test_library_api.py",
    "test_release.py",
    "test_checkpoint.py",
    "test_on_policy.py",
    "test_hf.py",
    "test_teacher_cache.py",
    "test_demo.py",
)


def pytest_configure(config):
    # xdist's default (--loadscope-reorder) hands out the files with the most tests first, which here puts the
    # slowest files (one or two long end-to-end tests each) last, one worker running them alone while the other idles.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
