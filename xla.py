"""How the scripts compile: our XLA options, less those the running XLA refuses (experimental ones
come and go between releases), and JAX's persistent compilation cache."""
import functools
import os
import sys

import jax

XLA_OPTIONS = {
    # XLA:CPU hands dots, elementwise ops and reductions to the YNNPACK library (PERFORMANCE.md,
    # section 7). Other backends ignore it.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    # XLA:GPU sums in a fixed order, so that a rerun or --resume prints the same numbers.
    "xla_gpu_deterministic_ops": True,
}


@functools.cache  # once per process: the answer is the installed XLA's, and its note is said once
def compiler_options():
    """XLA_OPTIONS less those that a no-op's compilation refuses, each named once on stderr."""
    options = {}
    for name, value in XLA_OPTIONS.items():
        try:
            jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
            options[name] = value
        except jax.errors.JaxRuntimeError as e:
            if jax.process_index() == 0:
                print(f"note: the XLA of JAX {jax.__version__} refuses {name} "
                      f"({str(e).splitlines()[0]}); going on with its default", file=sys.stderr)
    return options


def use_compilation_cache(several_processes=False):
    """JAX's compilation cache in the user's own cache folder (PERFORMANCE.md, section 5), unless
    JAX_COMPILATION_CACHE_DIR sets one; none at all in a run of several processes."""
    if several_processes:  # no help there, and a hang on JAX 0.12.1 (PERFORMANCE.md, section 6)
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or jax.config.jax_compilation_cache_dir:
        return
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    folder = os.path.join(cache_home, "mnist-jax-flax")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.stat(folder)
    except OSError:  # a read-only home, say: compile as without a cache
        return
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        print(f"note: not using the compilation cache {folder}: others can write to it",
              file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # not 1 s: most of ours
