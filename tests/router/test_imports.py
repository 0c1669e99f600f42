"""router/ and deploy/ stay torch-free at import time (layer rule; routers run on CPU boxes)."""

from __future__ import annotations

import subprocess
import sys


def test_router_and_deploy_do_not_import_torch():
    code = (
        "import sys\n"
        "import router.ingress, router.core, router.openai_api, router.grpc_api\n"
        "import deploy.app, deploy.cli, deploy.config\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
