"""Flower deployment, as one namespace (`fgrpo flower …`, tests and benchmarks use it as `deploy`).

- `fgrpo.deploy.commands`: command lines, the run config and connection files, TLS certificates and keys.
- `fgrpo.deploy.supervisor`: `LocalFederation`, the SuperLink and SuperNodes as processes on this machine.
"""

from fgrpo.deploy.commands import *  # noqa: F401,F403
from fgrpo.deploy.supervisor import *  # noqa: F401,F403
