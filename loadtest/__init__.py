"""Load generators, reports and the kernel floor of a recserve server.

    python -m loadtest closed --config configs/tiny.toml --bundle bundles/tiny   # starts a server
    python -m loadtest sweep --target 127.0.0.1:50051 --bundle bundles/default --slo-ms 50
    python -m loadtest.floor --config configs/tiny.toml --bundle bundles/tiny

The generators run in their own processes (grpc.aio, several connections each) so they
never share the server's GIL; see loadtest/generator.py for how requests are drawn and timed.
"""

import engine  # noqa: E402,F401 - before anything loads numpy: pins its BLAS to one thread, as in the server
