"""The XLA compile options of train.py's jitted functions, less those the running XLA refuses.

XLA fails every compile that names an option it does not know, and experimental options are renamed
or dropped between releases: here such an option is left out, with one line, instead.
"""
import functools
import sys

import jax

XLA_OPTIONS = {
    # XLA:CPU hands dots, elementwise ops and reductions to the YNNPACK library: a train step at
    # batch 32 went from 10.7 to 8.0 ms on 2 cores (PERFORMANCE.md). Other backends ignore it.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    # XLA:GPU sums in a fixed order, so that a rerun or --resume prints the same numbers.
    "xla_gpu_deterministic_ops": True,
}


@functools.cache  # once per process: the answer is the installed XLA's
def xla_options():
    """XLA_OPTIONS less those the running XLA refuses, each said once on stderr; compiling a no-op
    with each option tells (40-53 ms in all at start, PERFORMANCE.md)."""
    known = {}
    for name, value in XLA_OPTIONS.items():
        try:
            jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
            known[name] = value
        except jax.errors.JaxRuntimeError as e:
            if jax.process_index() == 0:
                reason = str(e).splitlines()[0]
                print(f"note: the XLA of JAX {jax.__version__} refuses {name} ({reason}); "
                      f"going on with its default", file=sys.stderr)
    return known


def jit_with_xla_options(**jit_kwargs):
    """functools.partial(jax.jit, **jit_kwargs) with xla_options(), looked up at the first call:
    importing train.py must leave starting JAX's backend to jax.distributed.initialize."""
    def decorate(fun):
        jitted = functools.cache(lambda: jax.jit(fun, compiler_options=xla_options(), **jit_kwargs))
        return functools.wraps(fun)(lambda *args, **kwargs: jitted()(*args, **kwargs))
    return decorate
