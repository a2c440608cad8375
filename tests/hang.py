"""The daemon, made to hang for the watchdog test: SIGUSR1 leaves its loop stuck in a
handler that never returns, the process alive, as a bug would.

    hang.py DAEMON_SCRIPT [ARGS...]
"""

import runpy
import signal
import sys
import time

signal.signal(signal.SIGUSR1, lambda *_: time.sleep(3600))
del sys.argv[0]
runpy.run_path(sys.argv[0], run_name="__main__")
