"""Put this folder on PYTHONPATH of a test subprocess that runs DeepSpeed on CPU.

DeepSpeed JIT-builds its CPU shared-memory communication op on first use (40-60 s, and again in
every fresh environment); gloo needs none of it. `DS_BUILD_SHM_COMM=0` does not stop the build,
marking the op incompatible does.
"""

try:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass
