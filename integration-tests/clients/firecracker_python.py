"""Drives a prescient VM with the `firecracker-python` package's API client (PyPI, 0.0.5),
unchanged: the calls a Firecracker user makes, against prescient's socket.

usage: firecracker_python.py API_SOCKET TEST_GUEST CONSOLE_LOG
"""
import sys
import time

from firecracker.api import Api, Resource
from firecracker.exceptions import APIError

sock, guest, console = sys.argv[1:4]
api = Api(sock)

info = api.describe.get().json()
assert info["state"] == "Not started", info
assert "firecracker_version" in api.version.get().json()

api.boot.put(kernel_image_path=guest, boot_args="cpu_ms=20 mem_mib=2 exit=halt")
api.machine_config.put(vcpu_count=2, mem_size_mib=128)
# The package has no helper for /serial (newer than it); its Resource class covers any path.
Resource(api, "/serial").put(serial_out_path=console)
api.logger.put(level="Info")
api.actions.put(action_type="InstanceStart")
assert api.describe.get().json()["state"] == "Running"

api.vm.patch(state="Paused")
assert api.describe.get().json()["state"] == "Paused"
api.vm.patch(state="Resumed")
assert api.describe.get().json()["state"] == "Running"

config = api.vm_config.get().json()
assert config["machine-config"]["vcpu_count"] == 2, config
assert config["boot-source"]["kernel_image_path"] == guest, config

try:
    api.machine_config.put(vcpu_count=4, mem_size_mib=128)
    raise SystemExit("a machine-config change after start was accepted")
except APIError as e:
    assert "after starting the microVM" in str(e), e

deadline = time.time() + 60
while "prescient-test-guest: done" not in open(console).read():
    assert time.time() < deadline, "the guest never finished"
    time.sleep(0.05)
print("client: ok")
