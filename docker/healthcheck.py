"""HEALTHCHECK of the chatbuild images: exit 0 once GET /healthz answers 200.

`chatbuild serve` answers /healthz with 200 only when its models are loaded, so a container is
"healthy" exactly when it can serve. Standard library only: the slim images have no curl.
"""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('CHATBUILD_PORT', '7860')}/healthz"
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as e:  # refused, timeout, 503 while loading: all mean "not healthy yet"
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
