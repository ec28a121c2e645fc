#!/usr/bin/python3
"""Disk workloads through a real NBD client (libnbd), for bench/disk-migrate.sh.

asyncwr: the storage-transfer paper's AsyncWR: compute for --compute-ms, then write
         --iter-mib MiB at the next offset of a --span-mib region (wrapping).
bonnie:  Bonnie-like passes over --span-mib: sequential write, rewrite (read + write back),
         read, repeated.

When the server answers ESHUTDOWN (the disk was handed over to the migration destination),
the client disconnects and reconnects to --next (waiting for its socket), then retries the
request: what a guest's disk does when its VM moves. Every second it prints one JSON line
{"t": seconds, "wrote_mib": ..., "read_mib": ..., "on": "src"|"dst"}; on SIGTERM or after
--duration it prints {"end": true, ...} and exits.
"""
import argparse
import errno
import json
import os
import signal
import sys
import time

import nbd


def connect(uri, deadline):
    while True:
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--next", help="the destination's NBD URI after a handover")
    p.add_argument("--mode", choices=["asyncwr", "bonnie"], default="asyncwr")
    p.add_argument("--offset-mib", type=int, default=0)
    p.add_argument("--span-mib", type=int, default=512)
    p.add_argument("--iter-mib", type=int, default=10)
    p.add_argument("--compute-ms", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=60.0)
    a = p.parse_args()

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    t0 = time.monotonic()
    h = connect(a.uri, t0 + 10)
    on = "src"
    block = 1 << 20
    buf = bytearray(os.urandom(block))
    wrote = read = 0
    total_w = total_r = 0
    last = t0
    pos = 0
    span = a.span_mib << 20
    base = a.offset_mib << 20
    phase = 0  # bonnie: 0 write, 1 rewrite, 2 read

    def io(fn):
        nonlocal h, on
        while True:
            try:
                return fn(h)
            except nbd.Error as e:
                if e.errnum != errno.ESHUTDOWN or not a.next or on == "dst":
                    raise
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
                h = connect(a.next, time.monotonic() + 60)
                on = "dst"

    def tick(force=False):
        nonlocal wrote, read, last
        now = time.monotonic()
        if force or now - last >= 1.0:
            print(json.dumps({"t": round(now - t0, 3), "wrote_mib": wrote / (1 << 20),
                              "read_mib": read / (1 << 20), "on": on, "dt": round(now - last, 3)}), flush=True)
            wrote = read = 0
            last = now

    while not stop and time.monotonic() - t0 < a.duration:
        if a.mode == "asyncwr":
            end = time.monotonic() + a.compute_ms / 1000
            x = 0
            while time.monotonic() < end:
                x += 1  # compute
            for i in range(a.iter_mib):
                buf[0] = (buf[0] + 1) & 0xFF
                off = base + (pos % span)
                io(lambda h, off=off: h.pwrite(buf, off))
                pos += block
                wrote += block
                total_w += block
            tick()
        else:
            off = base + (pos % span)
            if phase == 0:
                io(lambda h: h.pwrite(buf, off))
                wrote += block
                total_w += block
            elif phase == 1:
                data = io(lambda h: h.pread(block, off))
                io(lambda h: h.pwrite(data, off))
                read += block
                wrote += block
                total_w += block
                total_r += block
            else:
                io(lambda h: h.pread(block, off))
                read += block
                total_r += block
            pos += block
            if pos % span == 0:
                phase = (phase + 1) % 3
            tick()
    tick(force=True)
    io(lambda h: h.flush())
    print(json.dumps({"end": True, "t": round(time.monotonic() - t0, 3), "total_wrote_mib": total_w / (1 << 20),
                      "total_read_mib": total_r / (1 << 20), "on": on}), flush=True)
    try:
        h.shutdown()
    except nbd.Error:
        pass


if __name__ == "__main__":
    sys.exit(main())
