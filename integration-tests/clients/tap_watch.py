"""The host's end of a TAP in the MMDS test: counts the guest's test frames (ethertype 0x88b5)
and any frame for the metadata service's address (ARP for it, or IPv4 to it), which the VMM
must have kept from the TAP.

usage: tap_watch.py TAP EXPECT MMDS_IP READY_FILE  (READY_FILE is created once bound)
prints: peer: test=N leaks=M
"""
import socket
import struct
import sys
import time

tap, expect, mmds_ip, ready = sys.argv[1], int(sys.argv[2]), socket.inet_aton(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
s.bind((tap, 0))
s.settimeout(0.5)
open(ready, "w").close()

test = leaks = 0
deadline = time.time() + 60
quiet_until = None
while time.time() < deadline:
    if test >= expect and quiet_until is None:
        quiet_until = time.time() + 2  # anything else the guest sends arrives by then
    if quiet_until is not None and time.time() > quiet_until:
        break
    try:
        frame = s.recv(65536)
    except socket.timeout:
        continue
    if len(frame) < 14:
        continue
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x88B5:
        test += 1
    elif kind == 0x0806 and len(frame) >= 42 and frame[38:42] == mmds_ip:
        leaks += 1
    elif kind == 0x0800 and len(frame) >= 34 and frame[30:34] == mmds_ip:
        leaks += 1
print(f"peer: test={test} leaks={leaks}", flush=True)
