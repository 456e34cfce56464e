"""The environment of an analogjax subprocess a test starts: the session's own (its caches, its XLA flags, so a
program compiled there is compiled as in the test process and results compare bit for bit), CPU only, with the
number of fake devices the test asks for."""

import os


def cpu_env(devices: int = 8, **extra: str) -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)
