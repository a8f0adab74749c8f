"""Several processes as one training run: train.py's flags for jax.distributed, starting it,
and leaving it with one line instead of JAX's own abort.

One process per host, all started with the same flags. On one process none of this runs.
"""
import os
import socket
import sys
import time

import jax


class StartError(Exception):
    """jax.distributed cannot start; the message says why and what to do."""


def add_flags(parser):
    """The command-line flags of a distributed run."""
    parser.add_argument("--distributed", action="store_true", help="one of several processes "
                        "(one per host): jax.distributed finds the others on Cloud TPU, SLURM, "
                        "Open MPI, Kubernetes")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="with --num-processes and --process-id: where process 0 listens")
    parser.add_argument("--num-processes", type=int, help="how many processes train together")
    parser.add_argument("--process-id", type=int, help="this process's number, 0 to "
                        "--num-processes - 1")
    parser.add_argument("--peer-timeout", type=int, default=60, help="seconds to wait for the "
                        "coordinator at start, and for a silent process before the others stop")


def check_flags(parser, args):
    """parser.error for flags that do not go together; the explicit three imply --distributed."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in explicit):
        if None in explicit:
            parser.error("--coordinator, --num-processes and --process-id go together")
        if not 0 <= args.process_id < args.num_processes:
            parser.error(f"--process-id must be 0 to {args.num_processes - 1}, "
                         f"got {args.process_id}")
        args.distributed = True


def wait_for_coordinator(address, seconds):
    """Returns once something listens at HOST:PORT; StartError after `seconds`. JAX's own
    client aborts the process with a stack trace when it cannot reach the coordinator."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise StartError(f"cannot reach the coordinator at {address} within {seconds} "
                                 f"s ({e}); start process 0 there, or fix --coordinator") from None
            time.sleep(0.2)


def start(args):
    """jax.distributed.initialize with the flags' settings, or what it detects where unset."""
    if args.coordinator and args.process_id > 0:  # process 0 is the coordinator
        wait_for_coordinator(args.coordinator, args.peer_timeout)
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.peer_timeout,
                                   heartbeat_timeout_seconds=args.peer_timeout,
                                   shutdown_timeout_seconds=args.peer_timeout)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise StartError(f"jax.distributed could not start: {str(e).splitlines()[0]}") from None


def lost_peer(error):
    """Whether `error` is a collective that failed because another process is gone: Gloo, JAX's
    transport between CPU processes, and the coordination service name themselves in it."""
    return isinstance(error, (jax.errors.JaxRuntimeError, ValueError)) and any(
        name in str(error) for name in ("Gloo", "gloo", "coordination service"))


def lost_peer_message(error):
    """The line for a collective that failed because another process is gone."""
    return (f"error: process {jax.process_index()} lost another process "
            f"({str(error).splitlines()[0]}); once all are up again, continue with --resume")


def leave(message, every_process):
    """Prints message and exits with status 1. `every_process`: all processes stop with this
    error (flags that do not fit the devices), so they leave together."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if every_process:
        # Together through jax.distributed's barrier. Were process 0 to leave first, JAX would
        # abort the others, whose coordination service it hosts, before they print their line.
        jax.distributed.shutdown()
        sys.exit(1)
    # An error of this process alone: jax.distributed's exit barrier would wait for the others,
    # then abort with a stack trace. Leaving without it closes our connections at once, which
    # stops the other processes too.
    os._exit(1)
