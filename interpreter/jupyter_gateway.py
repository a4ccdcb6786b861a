"""nbclient (or any jupyter_client-style code) on vmcell kernels, through the kernel-gateway API.

    import nbformat
    from interpreter.jupyter_gateway import execute_notebook

    nb = nbformat.read("examples/notebooks/pandas_analysis.ipynb", as_version=4)
    execute_notebook(nb, "http://127.0.0.1:8890", token)   # outputs filled in; the VM is closed after

(8890 is `vmcell serve`'s default port: config.DEFAULT_PORT.)

It reuses jupyter_server's gateway kernel manager and client, with two fixes for use outside
jupyter_server: its GatewayKernelClient opens the channels websocket without the gateway's auth
header (its HTTP calls do send it), so against a gateway that requires a token, as vmcell does, it
gets a 401; and jupyter_client asks the manager whether the kernel *process* is alive, which
asserts a local provisioner that a gateway kernel does not have.
"""

from __future__ import annotations

from threading import Thread

import websocket
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_core.utils import ensure_async, run_sync
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelClient, GatewayKernelManager
from jupyter_server.utils import url_path_join
from tornado.escape import url_escape


class AuthenticatedGatewayKernelClient(GatewayKernelClient):
    async def start_channels(self, shell=True, iopub=True, stdin=True, hb=True, control=True):
        gateway = GatewayClient.instance()
        ws_url = url_path_join(gateway.ws_url or "", gateway.kernels_endpoint, url_escape(self.kernel_id), "channels")
        scheme = f"{gateway.auth_scheme} " if gateway.auth_scheme else ""
        self.channel_socket = websocket.create_connection(
            ws_url, timeout=gateway.KERNEL_LAUNCH_TIMEOUT, enable_multithread=True,
            header=[f"{gateway.auth_header_key}: {scheme}{gateway.auth_token}"],
        )
        await ensure_async(AsyncKernelClient.start_channels(self, shell=shell, iopub=iopub, stdin=stdin, hb=hb,
                                                            control=control))
        self.response_router = Thread(target=self._route_responses, daemon=True)
        self.response_router.start()

    async def _async_is_alive(self) -> bool:
        # The kernel lives behind the gateway: connected channels are what "alive" can mean here.
        return self.channel_socket is not None and self.channel_socket.connected


def vmcell_kernel_manager(url: str, token: str, kernel_name: str = "python") -> GatewayKernelManager:
    """A kernel manager whose kernels are vmcell sessions (one microVM each) at `url`."""
    gateway = GatewayClient.instance()
    gateway.url = url.rstrip("/")
    gateway.ws_url = gateway.url.replace("http", "ws", 1)
    gateway.auth_token = token
    return GatewayKernelManager(kernel_name=kernel_name, client_factory=AuthenticatedGatewayKernelClient)


def execute_notebook(nb, url: str, token: str, kernel_name: str = "python", timeout: float = 600):
    """Runs every cell of `nb` (an nbformat notebook) on a fresh vmcell kernel, in place, then closes
    the kernel: nbclient leaves a kernel manager it did not create running."""
    from nbclient import NotebookClient

    km = vmcell_kernel_manager(url, token, kernel_name)
    try:
        NotebookClient(nb, km=km, timeout=timeout, kernel_name=kernel_name).execute()
    finally:
        if km.kernel_id:
            run_sync(km.shutdown_kernel)()
    return nb
