"""Several processes, one per host, as one run: train.py's flags for jax.distributed, starting it,
and leaving it with one line instead of JAX's own abort."""
import os
import socket
import sys
import time

import jax


class StartError(Exception):
    """jax.distributed cannot start; the message says why and what to do."""


def add_flags(parser):
    """The command-line flags of a distributed run."""
    parser.add_argument("--distributed", action="store_true", help="one of several processes, one "
                        "per host, that jax.distributed finds (Cloud TPU, SLURM, Open MPI, ...)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="with --num-processes and --process-id: where process 0 listens")
    parser.add_argument("--num-processes", type=int, help="how many processes train together")
    parser.add_argument("--process-id", type=int, help="this process's number, from 0")
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
    """Returns once something listens at HOST:PORT, else StartError after `seconds`: JAX's own
    client aborts the process with a stack trace."""
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


def lost_peer_message(error):
    """The line for `error` if it is a collective that failed because another process is gone (Gloo,
    JAX's transport between CPU processes, or the coordination service names itself), else None."""
    if isinstance(error, (jax.errors.JaxRuntimeError, ValueError)) and any(
            name in str(error) for name in ("Gloo", "gloo", "coordination service")):
        return (f"error: process {jax.process_index()} lost another process "
                f"({str(error).splitlines()[0]}); once all are up again, continue with --resume")


def leave(message, every_process):
    """Prints message and exits with status 1; together with the others if every_process."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if every_process:
        # Through jax.distributed's barrier: were process 0, the coordinator, to leave first, JAX
        # would abort the others before they print their line.
        jax.distributed.shutdown()
        sys.exit(1)
    # Alone: JAX's exit barrier would wait for the others, then abort with a stack trace. Leaving
    # without it closes our connections, which stops the others too.
    os._exit(1)
