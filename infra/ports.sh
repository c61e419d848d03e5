# Port helpers shared by the stack scripts (sourced, not run).

# Servers bind with SO_REUSEADDR, so only a listener (not TIME_WAIT) makes a port unusable.
port_free() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# Prints N distinct free ports, taken below the kernel's ephemeral range so that a
# client connection's local port can never squat on a persisted broker port.
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    lo = 32768
socks = []
while len(socks) < int(sys.argv[1]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Below the ephemeral range if there is room there; else any free port.
        s.bind(("127.0.0.1", random.randrange(20000, lo) if lo > 21000 else 0))
    except OSError:
        s.close()
        continue
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
