"""--gdb: real gdb in batch mode against the hello guest, and a hostile client on the raw protocol."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

from helpers import require
from vmikit.guest.build import build_guest


def start_stub(*args: str) -> tuple[subprocess.Popen[str], int]:
    """`vmikit run ... --gdb 127.0.0.1:0` in a child; returns it and the port it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "vmikit", "run", *args, "--gdb", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"waiting on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return proc, int(match.group(1))


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_gdb_batch_session_on_hello(kvm: str) -> None:
    gdb = shutil.which("gdb")
    require(gdb is not None, "gdb not installed (apt-get install gdb)")
    assert gdb is not None
    image = build_guest("hello")
    proc, port = start_stub("hello")
    try:
        session = subprocess.run(
            [gdb, "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", f"file {image}",
             "-ex", f"target remote 127.0.0.1:{port}", "-ex", "print $rip", "-ex", "break kmain", "-ex", "continue",
             "-ex", "print $rip", "-ex", "print/x (unsigned int)boot_magic", "-ex", "stepi", "-ex", "print $rip",
             "-ex", "monitor state", "-ex", "continue"],
            capture_output=True, text=True, timeout=120)
    finally:
        status, out, err = finish(proc)
    text = session.stdout + session.stderr
    kmain = int(re.search(r"Breakpoint 1 at (0x[0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]
    assert "<_start>" in text  # stopped before the first instruction: the multiboot entry
    assert re.search(r"Breakpoint 1, 0x0*%x in kmain \(\)" % kmain, text), text
    assert f"(void (*)()) {kmain:#x} <kmain>" in text
    assert "$3 = 0x2badb002" in text  # a global the runtime set before kmain: the multiboot magic
    after = int(re.search(r"\$4 = \(void \(\*\)\(\)\) (0x[0-9a-f]+) <kmain\+\d+>", text).group(1), 16)  # type: ignore[union-attr]
    assert kmain < after <= kmain + 15  # one instruction on
    assert "cpl 3" in text and "deprivileged" in text  # kmain ran natively at ring 3
    assert "[Inferior 1 (Remote target) exited normally]" in text, text
    assert status == 0 and "DONE pass=" in out and "fail=0" in out, err


class Client:
    """A minimal RSP client for the hostile tests."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.raw(b"$" + payload + b"#%02x" % (sum(payload) & 0xFF))

    def read_ack(self) -> bytes:
        while not self.buf:
            self.buf += self.sock.recv(4096)
        ack, self.buf = self.buf[:1], self.buf[1:]
        return ack

    def reply(self) -> bytes:
        while True:
            while b"#" not in self.buf or len(self.buf) < self.buf.index(b"#") + 3:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError
                self.buf += chunk
            start = self.buf.index(b"$")
            end = self.buf.index(b"#", start)
            payload, self.buf = self.buf[start + 1:end], self.buf[end + 3:]
            self.raw(b"+")
            return payload

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def symbol(name: str) -> int:
    out = subprocess.run(["nm", str(build_guest("hello"))], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[0] for line in out.splitlines() if line.endswith(f" {name}")), 16)


def test_garbage_gets_error_replies_and_the_guest_still_runs(kvm: str) -> None:
    proc, port = start_stub("hello")
    client = Client(port)
    try:
        client.raw(b"\x00\xffgarbage+-+")  # between packets: ignored
        client.raw(b"$g#00")  # a wrong checksum
        assert client.read_ack() == b"-"
        client.raw(b"$" + b"A" * 100000 + b"#00")  # oversized: refused, not stored
        assert client.read_ack() == b"-"
        for bad in (b"mzz,4", b"m0", b"Mzz", b"P99=00", b"Z0,zz,1", b"p", b"G1", b"qXfer:features:read:target.xml:x",
                    b"qRcmd,zz"):
            assert client.ask(bad).startswith(b"E"), bad
        assert client.ask(b"vUnknownThing") == b""
        assert client.ask(b"m0,100000").startswith(b"E")  # more than the stub reads at once
        assert client.ask(b"mffff800000000000,8").startswith(b"E")  # not mapped
        assert client.ask(b"Mc0000,1:00").startswith(b"E")  # the read-only ROM
        assert client.ask(b"?").startswith(b"S05")
        assert len(client.ask(b"g")) == 2 * (17 * 8 + 7 * 4 + 8 * 10 + 8 * 4 + 2 * 8 + 5 * 8)
        xml = client.ask(b"qXfer:features:read:target.xml:0,ffff")
        assert xml.startswith(b"l") and b"i386:x86-64" in xml
        assert client.ask(b"c").startswith(b"W00")  # the guest ran to its end, unharmed
    finally:
        client.close()
        status, out, err = finish(proc)
    assert status == 0 and "fail=0" in out, err


def test_a_disconnect_lets_the_guest_run_to_its_end(kvm: str) -> None:
    proc, port = start_stub("hello")
    client = Client(port)
    kmain = symbol("kmain")
    assert client.ask(b"Z0,%x,1" % kmain) == b"OK"
    client.close()  # gone with a breakpoint inserted: it is removed, the guest goes on
    status, out, err = finish(proc)
    assert status == 0 and "DONE pass=" in out, err


def test_hardware_breakpoints_at_ring3_are_refused_in_one_line(kvm: str) -> None:
    proc, port = start_stub("hello")
    client = Client(port)
    try:
        assert client.ask(b"Z1,%x,1" % symbol("kmain")) == b"E01"
        assert client.ask(b"Z1,%x,1" % symbol("kmain")) == b"E01"
        assert client.ask(b"D") == b"OK"
    finally:
        client.close()
        status, out, err = finish(proc)
    assert status == 0
    assert err.count("hardware breakpoints do not fire at ring 3") == 1  # one line, however often asked


def test_ring0_kernel_software_and_hardware_breakpoints_and_step(kvm: str) -> None:
    """--privilege ring0: kmain runs emulated at ring 0, where KVM reports int3 and DR hits itself."""
    proc, port = start_stub("hello", "--privilege", "ring0")
    client = Client(port)
    kmain, report = symbol("kmain"), symbol("report")
    try:
        assert client.ask(b"Z0,%x,1" % kmain) == b"OK"
        assert client.ask(b"Z1,%x,1" % report) == b"OK"
        stop = client.ask(b"c")
        assert stop.startswith(b"T05") and b"swbreak" in stop
        assert int.from_bytes(bytes.fromhex(client.ask(b"p10").decode()), "little") == kmain
        assert client.ask(b"z0,%x,1" % kmain) == b"OK"
        assert client.ask(b"s").startswith(b"T05")
        rip = int.from_bytes(bytes.fromhex(client.ask(b"p10").decode()), "little")
        assert kmain < rip <= kmain + 15
        stop = client.ask(b"c")
        assert stop.startswith(b"T05") and b"hwbreak" in stop
        assert int.from_bytes(bytes.fromhex(client.ask(b"p10").decode()), "little") == report
        assert client.ask(b"z1,%x,1" % report) == b"OK"
        assert client.ask(b"c").startswith(b"W00")
    finally:
        client.close()
        status, out, err = finish(proc)
    assert status == 0, err


def test_ctrl_c_interrupts_and_kill_ends_the_run(kvm: str) -> None:
    proc, port = start_stub("hang", "--timeout", "60")
    client = Client(port)
    try:
        client.send(b"c")
        assert client.read_ack() == b"+"
        time.sleep(0.5)
        client.raw(b"\x03")
        assert client.reply().startswith(b"T02")
        client.send(b"k")
    finally:
        status, out, err = finish(proc)
        client.close()
    assert status == 1 and "gdb killed the guest" in err and err.count("\n") == 1  # one line (the waiting line was read before)


def test_bad_gdb_address_is_one_line(kvm: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vmikit", "run", "hello", "--gdb", "nohost:notaport"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a [HOST:]PORT" in proc.stderr
