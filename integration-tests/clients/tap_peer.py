"""The host's end of a TAP in the net test: waits for the guest's frames (ethertype 0x88b5),
then sends frames to the guest (ethertype 0x88b6).

usage: tap_peer.py TAP EXPECT SEND READY_FILE  (READY_FILE is created once the socket is bound)
"""
import socket
import struct
import sys
import time

tap, expect, send, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
s.bind((tap, 0))
s.settimeout(1.0)
open(ready, "w").close()

got = 0
deadline = time.time() + 60
while got < expect:
    if time.time() > deadline:
        sys.exit(f"peer: only {got} of {expect} guest frames")
    try:
        frame = s.recv(65536)
    except socket.timeout:
        continue
    if len(frame) >= 14 and struct.unpack("!H", frame[12:14])[0] == 0x88B5:
        got += 1

for i in range(send):
    dst, src = b"\xff" * 6, b"\x02\x00\x00\x00\x00\x01"
    payload = b"host" + struct.pack("!I", i) + b"\0" * 38
    s.send(dst + src + struct.pack("!H", 0x88B6) + payload)
print(f"peer: got {got} sent {send}", flush=True)
