"""Other hosts over SSH (harness/remote): the host spec as input, then a real dropbear in a real
network namespace: quoting, host keys, processes tied to their connection, files, tunnels, the
link between the hosts, and that the test hosts leave nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from harness.core.errors import SetupError, UsageError
from harness.remote import netns
from harness.remote.link import Link
from harness.remote.ssh import HostSpec, RemoteError, RemoteHost, stage, write_known_hosts
from harness.remote.testhosts import TestHosts, _state

# -- the spec: pure input checking ---------------------------------------------------------


def test_host_spec_parses_user_addr_port_and_round_trips():
    s = HostSpec.parse("root@10.77.0.2", key_file="/k", known_hosts="/kh")
    assert (s.user, s.addr, s.port, s.label) == ("root", "10.77.0.2", 22, "root@10.77.0.2:22")
    assert HostSpec.parse("qa@dst.example.org:2222").port == 2222
    assert HostSpec.from_json(s.to_json()) == s
    # What a result records of it: where, never a key's content.
    assert set(s.to_json()) == {"user", "addr", "port", "key_file", "known_hosts"}


@pytest.mark.parametrize("text,why", [
    ("10.77.0.2", "expected USER@ADDR"),
    ("root@", "expected USER@ADDR"),
    ("root@host:ssh", "not a number"),
    ("root@host:0", "not in 1..65535"),
    ("root@host;reboot", "not a host name"),
    ("root@$(touch x)", "not a host name"),
    ("root@-oProxyCommand=x", "not a host name"),
    ("ro ot@host", "not a plain user name"),
])
def test_host_spec_refuses_what_a_shell_or_ssh_would_read_as_more(text: str, why: str):
    with pytest.raises(UsageError, match=why):
        HostSpec.parse(text)


def test_known_hosts_line_names_a_non_default_port_in_brackets(tmp_path: Path):
    write_known_hosts(tmp_path / "kh", "10.0.0.9", 2222, "ssh-ed25519 AAAAC3Nza x@y")
    assert (tmp_path / "kh").read_text() == "[10.0.0.9]:2222 ssh-ed25519 AAAAC3Nza\n"


def test_a_link_to_this_host_is_refused():
    with pytest.raises(SetupError, match="via lo"):
        Link.towards("127.0.0.1")


# -- a real dropbear in a network namespace ----------------------------------------------------


def test_commands_are_quoted_never_pasted_into_a_shell(two_hosts: TestHosts, tmp_path: Path):
    canary = tmp_path / "canary"
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            hostile = f"$(touch {canary}); touch {canary} `touch {canary}`"
            assert h.run(["echo", hostile], 10).out == hostile + "\n"
            assert h.script('printf "%s|" "$@"', [hostile, "a b"], 10).out == f"{hostile}|a b|"
            assert not canary.exists()
            with pytest.raises(RemoteError, match=r"failed \(3\)"):
                h.run(["sh", "-c", "exit 3"], 10)
        finally:
            h.close()


def test_an_unknown_or_changed_host_key_is_refused(two_hosts: TestHosts, tmp_path: Path):
    d = two_hosts.dst
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    other = tmp_path / "other_known_hosts"
    subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(tmp_path / "k")],
                   capture_output=True, check=True, timeout=20)
    pub = subprocess.run(["dropbearkey", "-y", "-f", str(tmp_path / "k")], capture_output=True,
                         text=True, check=True, timeout=20).stdout
    write_known_hosts(other, d.addr, 22, next(x for x in pub.splitlines()
                                              if x.startswith("ssh-ed25519 ")))
    with two_hosts.on_source():
        # The control: the right known_hosts connects.
        RemoteHost(d).connect().close()
        with pytest.raises(RemoteError, match="host key not in"):
            RemoteHost(HostSpec(d.user, d.addr, key_file=d.key_file,
                                known_hosts=str(empty))).connect()
        with pytest.raises(RemoteError, match="host key does not match"):
            RemoteHost(HostSpec(d.user, d.addr, key_file=d.key_file,
                                known_hosts=str(other))).connect()


def test_a_key_the_host_does_not_know_gets_no_login(two_hosts: TestHosts, tmp_path: Path):
    stranger = tmp_path / "stranger"
    paramiko.ECDSAKey.generate(bits=256).write_private_key_file(str(stranger))
    d = two_hosts.dst
    with two_hosts.on_source(), pytest.raises(RemoteError, match="SSH failed"):
        RemoteHost(HostSpec(d.user, d.addr, key_file=str(stranger),
                            known_hosts=d.known_hosts)).connect()


def test_a_started_process_ends_with_its_connection(two_hosts: TestHosts):
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            d = h.mkdtemp("nestvirt-dst-")
            cat = h.start(["cat"], f"{d}/err")
            s = cat.stdio_socket()
            s.sendall(b"ping\n")
            s.settimeout(10)
            echoed = b""
            while len(echoed) < 5:  # a stream: the echo may come in pieces
                chunk = s.recv(16)
                assert chunk, f"EOF after {echoed!r}"
                echoed += chunk
            assert echoed == b"ping\n"  # its stdin/stdout are the local socket
            sleeper = h.start(["sleep", "300"], f"{d}/err")
            assert sleeper.poll() is None
            # Closing its connection ends it: setpriv's parent-death signal, no kill needed.
            sleeper.close()
            deadline = time.monotonic() + 10
            while _state(sleeper.pid) not in ("Z", "gone") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _state(sleeper.pid) in ("Z", "gone")
            assert cat.kill(h) == -1 and cat.poll() == -1  # killed by a signal
            h.script('case "$1" in /tmp/nestvirt-dst-*) rm -rf -- "$1";; esac', [d], 10)
        finally:
            h.close()


def test_files_go_there_atomically_and_private(two_hosts: TestHosts):
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            d = h.mkdtemp("nestvirt-dst-")
            assert h.run(["stat", "-c", "%a", d], 10).out.strip() == "700"
            data = os.urandom(300_000)
            h.put(data, f"{d}/blob")
            assert h.read(f"{d}/blob") == data.decode(errors="replace").encode()
            assert h.run(["stat", "-c", "%a", f"{d}/blob"], 10).out.strip() == "600"
            assert h.read(f"{d}/absent") is None
            h.run(["rm", "-rf", "--", d], 10)
        finally:
            h.close()


def test_stage_uses_a_shared_path_or_uploads_once(two_hosts: TestHosts, tmp_path: Path):
    assert two_hosts.rundir is not None
    shared = two_hosts.rundir / "kernel.img"  # outside /tmp: both hosts see it
    shared.write_bytes(os.urandom(100_000))
    hidden = tmp_path / "initrd.img"  # under this host's /tmp: host B has its own /tmp
    hidden.write_bytes(os.urandom(200_000))
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            assert stage(h, shared) == str(shared)  # same bytes at the same path: used as is
            assert h.run(["ls", "-A", "/tmp"], 10).out == ""
            there = stage(h, hidden)
            assert there != str(hidden) and "/.cache/nestvirt/staged/" in there
            digest = hashlib.sha256(hidden.read_bytes()).hexdigest()
            assert h.run(["sha256sum", there], 10).out.split()[0] == digest
            assert stage(h, hidden) == there  # found in the cache: not uploaded again
        finally:
            h.close()


def test_a_tunnel_reaches_the_remote_loopback(two_hosts: TestHosts):
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            # dropbear itself listens on the test address, not on B's loopback: the tunnel
            # is refused there, and reaches the SSH banner on the address it does listen on.
            with pytest.raises(RemoteError, match="tunnel to 127.0.0.1:22"):
                h.tunnel("127.0.0.1", 22)
            ch = h.tunnel(two_hosts.dst.addr, 22)
            ch.settimeout(5)
            assert ch.recv(64).startswith(b"SSH-2.0-dropbear")
            ch.close()
        finally:
            h.close()


def test_the_link_goes_down_and_up_and_takes_a_throttle(two_hosts: TestHosts):
    d = two_hosts.dst
    with two_hosts.on_source():
        link = Link.towards(d.addr)
        assert two_hosts.pair is not None and link.dev == two_hosts.pair.dev_a
        assert link.is_up()
        link.down()
        assert not link.is_up()
        with pytest.raises(OSError):
            socket.create_connection((d.addr, 22), timeout=1).close()
        link.up()
        link.throttle("50mbit")
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", link.dev], capture_output=True,
                               text=True, timeout=10).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc
        link.unthrottle()
        deadline = time.monotonic() + 10
        while True:  # carrier comes back within a moment
            try:
                socket.create_connection((d.addr, 22), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "link did not come back"
                time.sleep(0.1)


def test_this_thread_alone_enters_a_namespace(two_hosts: TestHosts):
    home = netns.current()
    with two_hosts.on_source():
        inside = netns.current()
        assert inside != home
        assert Path(f"/run/netns/{two_hosts.source_ns}").stat().st_ino == int(inside[5:-1])
    assert netns.current() == home


def test_test_hosts_leave_nothing_and_name_what_leaked():
    why = netns.available()
    if why:
        pytest.skip(why)
    with TestHosts() as hosts:
        pair = hosts.pair
        assert pair is not None
        rundir = hosts.rundir
        # A process left inside host B (as a leaking harness would leave a QEMU):
        leak = subprocess.Popen(["ip", "netns", "exec", pair.b, "sleep", "300"],
                                start_new_session=True)
        deadline = time.monotonic() + 10
        while pair.b not in subprocess.run(["ip", "netns", "identify", str(leak.pid)],
                                           capture_output=True, text=True, timeout=5).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    leak.wait(10)
    assert len(hosts.leftovers) == 1 and "sleep 300" in hosts.leftovers[0]
    assert pair.exists() == [] and rundir is not None and not rundir.exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert str(rundir) not in ps  # dropbear gone with its dir
