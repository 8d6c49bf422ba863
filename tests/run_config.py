"""The tiny run config of the end-to-end tests, as a config file for the command line.

With REVAL_TEST_PAUSE_AFTER=i in the environment (the SIGTERM test), the run stops after writing
the train record of iteration i until its SIGTERM handler has run: the test signals a run that is
known to be at iteration i, instead of racing it to the end.
"""

import os

from helpers import HANG_S, tiny_config


def get_config():
    if os.environ.get("REVAL_TEST_PAUSE_AFTER"):
        _pause_after(int(os.environ["REVAL_TEST_PAUSE_AFTER"]))
    return tiny_config(os.environ["REVAL_TEST_DATA"], num_iterations=4)


def _pause_after(iteration: int) -> None:
    import signal
    import time

    from reval_jax.run.metrics import MetricsWriter

    if getattr(MetricsWriter.write, "pauses", False):
        return
    received = []
    install, write = signal.signal, MetricsWriter.write

    def signal_(signum, handler):  # notes when the handler the run installs for SIGTERM has run
        if signum == signal.SIGTERM and callable(handler):
            def on_sigterm(*args, handler=handler):
                handler(*args)
                received.append(signum)

            return install(signum, on_sigterm)
        return install(signum, handler)

    def write_(self, kind, step, *args, **kwargs):
        write(self, kind, step, *args, **kwargs)
        if kind == "train" and step == iteration:
            deadline = time.monotonic() + HANG_S  # the test died without signalling: go on
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)  # the handler runs here, in the main thread

    write_.pauses = True
    signal.signal = signal_
    MetricsWriter.write = write_
