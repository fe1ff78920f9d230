#!/usr/bin/env python3
# A DNS server for the benchmark (a program, not a test): answers A queries for any name with
# 127.0.0.1 and AAAA with no records, each after DELAY_MS (a resolver a round trip away), on
# 127.0.0.1:53, a thread a query; SIGUSR1 prints the queries answered so far. With
# /etc/resolv.conf saying `nameserver 127.0.0.1` (session 24's runs also had `options
# timeout:1 attempts:1`; root; put the original back after),
# `UPHOST=upstream.test tests/load/bench.sh` measures what new upstream connections'
# address lookups cost:
#
#   python3 tests/load/dns.py 5 &
import socket, struct, sys, threading, time, signal
delay = float(sys.argv[1]) / 1000
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
count = [0]
signal.signal(signal.SIGUSR1, lambda *a: print(count[0], flush=True))
def answer(q, addr):
    time.sleep(delay)
    qid, flags, qd = struct.unpack(">HHH", q[:6])
    i = 12
    while q[i]: i += q[i] + 1
    qtype = struct.unpack(">H", q[i+1:i+3])[0]
    question = q[12:i+5]
    a = qtype == 1
    head = struct.pack(">HHHHHH", qid, 0x8180, 1, 1 if a else 0, 0, 0)
    rr = struct.pack(">HHHIH", 0xC00C, 1, 1, 30, 4) + bytes([127, 0, 0, 1]) if a else b""
    s.sendto(head + question + rr, addr)
while True:
    q, addr = s.recvfrom(512)
    count[0] += 1
    threading.Thread(target=answer, args=(q, addr), daemon=True).start()
