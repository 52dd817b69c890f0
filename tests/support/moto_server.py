"""moto's server, as `moto_server -H HOST -p PORT` runs it, with two changes the tests need.

1. Requests are served one at a time. moto evaluates a DynamoDB condition expression and
   then writes the item with no lock between the two, so two threads of its threaded server
   can both pass `attribute_not_exists(#id)` and both write: on a loaded machine, two
   concurrent claims of one key both won. DynamoDB itself applies a conditional write
   atomically; serialising moto's requests gives the tests that guarantee (connections are
   still accepted and read concurrently, only the backend runs under the lock).
2. The listen backlog is 1024, not werkzeug's 128, so that a race opening hundreds of
   connections at once is not answered with dropped SYNs and connect timeouts.

usage: python moto_server.py HOST PORT
"""

import os
import signal
import sys
import threading

from werkzeug import serving
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    # As moto_server sets it: moto builds some URLs from it.
    os.environ.setdefault("MOTO_PORT", str(port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialised(environ, start_response):
        with lock:
            # The whole response is produced under the lock, so a lazy body cannot touch
            # the backend after it is released.
            return list(app(environ, start_response))

    serving.BaseWSGIServer.request_queue_size = 1024
    serving.run_simple(
        host, port, serialised, threaded=True, request_handler=MotoRequestHandler
    )


if __name__ == "__main__":
    main()
