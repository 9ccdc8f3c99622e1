"""stamp.rest: the stamp over the Azure Blob REST protocol (page blobs).

`stamp serve` runs it (stamp.rest.server); the modules, one per concept:
dispatch (routing and the request pipeline), containers and pageblobs (the
operations), xmlbody (XML bodies), errors (the service's errors), auth
(Shared Key, Shared Key Lite, SAS, anonymous), conditions (If-* headers),
headers (parsing), call (a request and the shared server state).
"""

from .auth import DEVSTORE_ACCOUNT, DEVSTORE_KEY, Accounts
from .call import Limits, Service
from .dispatch import Endpoint
from .server import serve

__all__ = ["DEVSTORE_ACCOUNT", "DEVSTORE_KEY", "Accounts", "Endpoint", "Limits", "Service", "serve"]
