"""How the scripts compile: XLA's options for train.py's jitted steps, less any that the running XLA
refuses, and JAX's persistent compilation cache.

XLA fails every compile that names an option it does not know, and experimental options are renamed
or dropped between releases: a run there goes on without that option, and says so once.
"""
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
    """XLA_OPTIONS less those the running XLA refuses, each refused one said once on stderr.
    Compiling a no-op with each option tells; call it once JAX may start its backend (after
    jax.distributed)."""
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
    """JAX's persistent compilation cache in this user's cache folder, so that a second start
    compiles nothing (PERFORMANCE.md, section 5); none where JAX_COMPILATION_CACHE_DIR is set
    (empty: no cache). JAX runs what it finds there, so a folder others can write is not used.
    In a run of several processes no cache at all, not even JAX_COMPILATION_CACHE_DIR's."""
    if several_processes:
        # No help there, and a hang on JAX 0.12.1 (PERFORMANCE.md, section 6).
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
    # Every compilation: the default, 1 s, skips most of ours.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
