"""The XLA compile options of train.py's jitted functions, and what to do where the running XLA refuses one.

XLA fails every compile that names an option it does not know, and experimental options are renamed
or dropped between releases: a run there goes on without that option, and says so once.
"""
import functools
import sys

import jax

XLA_OPTIONS = {
    # XLA:CPU hands dots, elementwise ops and reductions to the YNNPACK library (PERFORMANCE.md,
    # section 6). Other backends ignore it.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    # XLA:GPU sums in a fixed order, so that a rerun or --resume prints the same numbers.
    "xla_gpu_deterministic_ops": True,
}


@functools.cache  # once per process: the answer is the installed XLA's
def refused_options():
    """The names in XLA_OPTIONS that the running XLA refuses, each said once on stderr. Compiling a
    no-op with each option tells; call it once JAX may start its backend (after jax.distributed)."""
    refused = []
    for name, value in XLA_OPTIONS.items():
        try:
            jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
        except jax.errors.JaxRuntimeError as e:
            refused.append(name)
            if jax.process_index() == 0:
                print(f"note: the XLA of JAX {jax.__version__} refuses {name} ({str(e).splitlines()[0]}); "
                      f"going on with its default", file=sys.stderr)
    return tuple(refused)


@functools.cache  # one jit object per function: a new one would compile again
def without_refused_options(jitted, **jit_kwargs):
    """`jitted` (a jax.jit with XLA_OPTIONS) where the running XLA takes them all; else its function
    jitted again, with jit_kwargs, less the options it refuses."""
    if not refused_options():
        return jitted
    options = {name: value for name, value in XLA_OPTIONS.items() if name not in refused_options()}
    return jax.jit(jitted.__wrapped__, compiler_options=options, **jit_kwargs)
