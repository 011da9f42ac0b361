"""netdevd's QMP protocol, checked against QEMU's behaviour with QEMU's own Python client.

References: docs/interop/qmp-spec.rst and /work/shared/reference/qemu-netdev.md §3 (protocol)
and §7 (error texts).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import threading
import time

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness import TIMEOUT, RawQmp, assert_error, qmp_client, run

HUBPORT = {"type": "hubport", "id": "n0", "hubid": 0}


async def expect_error(client, command: str, arguments: dict | None = None) -> tuple[str, str]:
    """Runs a command that must fail; returns (class, desc)."""
    with pytest.raises(ExecuteError) as info:
        await client.execute(command, arguments)
    return info.value.error.error.class_, info.value.error.error.desc


# --------------------------------------------------------------------------------------------
# 1. Greeting
# --------------------------------------------------------------------------------------------


def test_greeting_and_query_version(daemon):
    """The greeting carries VersionInfo and 'oob'; qemu.qmp negotiates and can run commands."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            greeting = client.greeting._asdict()
            version = await client.execute("query-version")
            return greeting, version

    greeting, version = run(body())
    qmp = greeting["QMP"]
    for part in ("major", "minor", "micro"):
        assert type(qmp["version"]["qemu"][part]) is int
    assert "netdevd" in qmp["version"]["package"]
    assert "oob" in qmp["capabilities"]
    # The greeting's version is exactly query-version's result.
    assert version == qmp["version"]


def test_greeting_with_legacy_client(daemon):
    """The synchronous legacy client connects, negotiates and runs a command."""
    qmp = QEMUMonitorProtocol(daemon.socket_path)
    try:
        qmp.settimeout(TIMEOUT)
        greeting = qmp.connect()
        assert "netdevd" in greeting["QMP"]["version"]["package"]
        assert qmp.cmd("query-version") == greeting["QMP"]["version"]
    finally:
        qmp.close()


# --------------------------------------------------------------------------------------------
# 2. Capabilities negotiation, on the wire
# --------------------------------------------------------------------------------------------


def test_negotiation_state(daemon):
    """Only qmp_capabilities works before negotiation, and only once."""
    with RawQmp(daemon.socket_path) as qmp:
        assert list(qmp.greeting) == ["QMP"]
        expecting = "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert_error(qmp.cmd("query-version"), "CommandNotFound", expecting)
        # query-commands is itself a command that does not exist yet.
        assert_error(qmp.cmd("query-commands"), "CommandNotFound", expecting)
        # So is an unknown command: the desc is replaced during negotiation.
        assert_error(qmp.cmd("nope"), "CommandNotFound", expecting)
        assert qmp.cmd("qmp_capabilities") == {"return": {}}
        assert_error(
            qmp.cmd("qmp_capabilities"),
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        )
        assert "return" in qmp.cmd("query-version")
        names = [c["name"] for c in qmp.cmd("query-commands")["return"]]
        assert "qmp_capabilities" in names and "netdev_add" in names and "query-commands" in names


def test_negotiation_is_per_connection(daemon):
    """A second connection starts in negotiation mode again."""
    with RawQmp(daemon.socket_path, negotiate=True) as first, RawQmp(daemon.socket_path) as second:
        assert "return" in first.cmd("query-version")
        assert second.cmd("query-version")["error"]["class"] == "CommandNotFound"


def test_capabilities_arguments(daemon):
    """qmp_capabilities accepts enable=['oob'] and rejects unknown capabilities as QEMU does."""
    with RawQmp(daemon.socket_path) as qmp:
        assert_error(
            qmp.cmd("qmp_capabilities", {"enable": ["foo"]}),
            "GenericError",
            "Parameter 'null' does not accept value 'foo'",
        )
        assert qmp.cmd("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}


def test_lines_end_with_crlf(daemon):
    """Responses are single lines terminated by CRLF, with QEMU's spacing."""
    with RawQmp(daemon.socket_path) as qmp:
        qmp.send('{"execute": "qmp_capabilities"}\n{"execute": "nope", "id": 3}\n')
        assert qmp.recv_line() == b'{"return": {}}\r\n'
        line = qmp.recv_line()  # recv_line checks the CRLF
        assert line.count(b"\n") == 1
        assert json.loads(line) == {
            "id": 3,
            "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        }


def test_events_not_delivered_before_negotiation(daemon):
    """An unnegotiated client gets no SHUTDOWN event; a negotiated one does."""
    with RawQmp(daemon.socket_path) as waiting, RawQmp(daemon.socket_path, negotiate=True) as ready:
        daemon.terminate()
        assert waiting.read_until_eof() == []
        events = [json.loads(line) for line in ready.read_until_eof()]
        assert [e["event"] for e in events] == ["SHUTDOWN"]
    assert daemon.wait() == 0


# --------------------------------------------------------------------------------------------
# 3. ids and framing
# --------------------------------------------------------------------------------------------

IDS = [7, -1, "abc", "", {"a": [1, {"b": None}]}, [1, "two", 3.5], None, True]


def same_id(response: dict, request_id) -> bool:
    """The response's id is exactly the request's (True is not 1, 3.5 is not "3.5")."""
    return "id" in response and json.dumps(response["id"]) == json.dumps(request_id)


@pytest.mark.parametrize("request_id", IDS, ids=lambda v: type(v).__name__)
def test_id_is_echoed(daemon, request_id):
    """Any JSON id comes back verbatim on success and on every kind of error."""
    with RawQmp(daemon.socket_path) as qmp:
        # Before negotiation.
        response = qmp.cmd("query-version", id=request_id)
        assert same_id(response, request_id) and response["error"]["class"] == "CommandNotFound"
        response = qmp.cmd("qmp_capabilities", id=request_id)
        assert same_id(response, request_id) and response["return"] == {}
        # Success, command error, unknown command, argument error, malformed request.
        response = qmp.cmd("query-version", id=request_id)
        assert same_id(response, request_id) and "return" in response
        for response in (
            qmp.cmd("netdev_del", {"id": "nosuch"}, id=request_id),
            qmp.cmd("nope", id=request_id),
            qmp.cmd("query-version", {"x": 1}, id=request_id),
            qmp.cmd("query-version", id=request_id, bogus=1),
        ):
            assert "error" in response and same_id(response, request_id), response
        qmp.send(json.dumps({"execute": 1, "id": request_id}) + "\n")
        response = qmp.recv()
        assert same_id(response, request_id)
        assert response["error"]["desc"] == "QMP input member 'execute' must be a string"


def test_id_absent_when_not_sent(daemon):
    """No id in the request, no id in the response."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        assert qmp.cmd("query-version").keys() == {"return"}
        assert qmp.cmd("nope").keys() == {"error"}


def test_string_id_with_qemu_qmp(daemon):
    """qemu.qmp's legacy cmd_obj sends the caller's id and matches the echoed one."""
    qmp = QEMUMonitorProtocol(daemon.socket_path)
    try:
        qmp.settimeout(TIMEOUT)
        qmp.connect()
        ok = qmp.cmd_obj({"execute": "query-version", "id": "mine-1"})
        assert ok["id"] == "mine-1" and "return" in ok
        failed = qmp.cmd_obj({"execute": "netdev_del", "arguments": {"id": "nosuch"}, "id": "mine-2"})
        assert failed == {
            "id": "mine-2",
            "error": {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"},
        }
    finally:
        qmp.close()


def test_json_syntax_error_has_no_id_and_connection_survives(daemon):
    """A syntax error is answered without id; the next request is answered normally."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send('{"execute": nope, "id": 1}\n')
        response = qmp.recv()
        assert response.keys() == {"error"}
        assert response["error"]["class"] == "GenericError"
        assert response["error"]["desc"].startswith("JSON parse error")
        assert qmp.cmd("query-version", id=2)["id"] == 2


@pytest.mark.parametrize("bad", ['{"execute": nope}', '{"execute" "query-version"}'])
def test_syntax_error_does_not_swallow_the_next_request(daemon, bad):
    """After a syntax error QEMU resumes at the next value, not at the next newline.

    QEMU's JSON streamer is not line based (json-streamer.c / json-parser.c): once the braces of
    the bad value balance, parsing starts afresh, so a request that follows on the same line
    (or in the same write) is answered.
    """
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(bad + '{"execute": "query-version", "id": 1}\n')
        error = qmp.recv()
        assert error.keys() == {"error"} and error["error"]["desc"].startswith("JSON parse error")
        response = qmp.recv()
        assert response.get("id") == 1 and "return" in response, response


@pytest.mark.parametrize("value", ["[1]", "null", "3", '"text"'])
def test_non_object_input(daemon, value):
    """Valid JSON that is not an object: GenericError without id."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(value + "\n")
        assert qmp.recv() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert qmp.cmd("query-version", id=1)["id"] == 1


@pytest.mark.parametrize(
    "request_, desc",
    [
        ({"execute": "query-version", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": "query-version", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
        ({"exec-oob": "query-version"}, "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_malformed_requests(daemon, request_, desc):
    """Requests that parse but are not valid QMP commands (qmp_dispatch_check_obj)."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(json.dumps({**request_, "id": "m"}) + "\n")
        assert qmp.recv() == {"id": "m", "error": {"class": "GenericError", "desc": desc}}


def test_several_requests_in_one_write(daemon):
    """Input is a stream of JSON values: no newlines needed, answers come in order."""
    with RawQmp(daemon.socket_path) as qmp:
        requests = [
            {"execute": "qmp_capabilities", "id": 0},
            {"execute": "query-version", "id": 1},
            {"execute": "nope", "id": 2},
            {"execute": "netdev_add", "arguments": HUBPORT, "id": 3},
            {"execute": "x-query-netdevs", "id": 4},
            {"execute": "netdev_del", "arguments": {"id": "n0"}, "id": 5},
        ]
        qmp.send("".join(json.dumps(r, separators=(",", ":")) for r in requests))
        responses = [qmp.recv() for _ in requests]
        assert [r["id"] for r in responses] == [0, 1, 2, 3, 4, 5]
        assert responses[2]["error"]["class"] == "CommandNotFound"
        assert [n["id"] for n in responses[4]["return"]] == ["n0"]
        assert responses[5] == {"return": {}, "id": 5}


def test_request_split_across_writes(daemon):
    """A request may arrive in pieces."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        text = json.dumps({"execute": "query-version", "id": "split"})
        for piece in (text[:5], text[5:17], text[17:]):
            qmp.send(piece)
            time.sleep(0.02)
        qmp.send("\n")
        assert qmp.recv()["id"] == "split"


def test_non_ascii_is_escaped(daemon):
    """Output is ASCII only: non-ASCII characters in echoed ids become \\uXXXX."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(json.dumps({"execute": "query-version", "id": "é😀"}, ensure_ascii=False) + "\n")
        line = qmp.recv_line()
        assert line.isascii()
        assert b'"id": "\\u00E9\\uD83D\\uDE00"' in line
        assert json.loads(line)["id"] == "é😀"


def test_control_characters_are_escaped_like_qemu(daemon):
    """json-writer.c writes every code point below 0x20 and from 0x7F up as \\u%04X (upper case)."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send('{"execute": "query-version", "id": "\\u007f\\u001f\\u0001"}\n')
        line = qmp.recv_line()
        assert b'"id": "\\u007F\\u001F\\u0001"' in line, line


# --------------------------------------------------------------------------------------------
# 4. Error classes and texts (qemu.qmp's ExecuteError)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, arguments, cls, desc",
    [
        ("nope", None, "CommandNotFound", "The command nope has not been found"),
        ("netdev_del", {"id": "nosuch"}, "DeviceNotFound", "Device 'nosuch' not found"),
        ("set_link", {"name": "nosuch", "up": False}, "DeviceNotFound", "Device 'nosuch' not found"),
        ("netdev_del", {}, "GenericError", "Parameter 'id' is missing"),
        ("netdev_del", {"id": 1}, "GenericError", "Invalid parameter type for 'id', expected: string"),
        ("netdev_add", {"id": "x", "hubid": 0}, "GenericError", "Parameter 'type' is missing"),
        ("netdev_add", {"type": "hubport", "hubid": 0}, "GenericError", "Parameter 'id' is missing"),
        ("netdev_add", {"type": "hubport", "id": "x"}, "GenericError", "Parameter 'hubid' is missing"),
        ("netdev_add", {**HUBPORT, "bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
        (
            "netdev_add", {**HUBPORT, "hubid": "x"},
            "GenericError", "Invalid parameter type for 'hubid', expected: integer",
        ),
        (
            "netdev_add", {**HUBPORT, "hubid": 1.5},
            "GenericError", "Invalid parameter type for 'hubid', expected: integer",
        ),
        ("netdev_add", {**HUBPORT, "hubid": 2**31}, "GenericError", "Parameter 'hubid' expects int32_t"),
        ("netdev_add", {**HUBPORT, "id": "1bad"}, "GenericError", "Parameter 'id' expects an identifier"),
        ("netdev_add", {**HUBPORT, "id": ""}, "GenericError", "Parameter 'id' expects an identifier"),
        ("netdev_add", {**HUBPORT, "id": "a/b"}, "GenericError", "Parameter 'id' expects an identifier"),
        ("netdev_add", {**HUBPORT, "type": "foo"}, "GenericError", "Parameter 'type' does not accept value 'foo'"),
        ("netdev_add", {**HUBPORT, "netdev": "nope"}, "GenericError", "netdev 'nope' not found"),
        (
            "netdev_add", {"type": "nic", "id": "x", "netdev": "nope"},
            "GenericError", "netdev 'nope' not found",
        ),
        (
            "netdev_add", {"type": "none", "id": "x"},
            "GenericError", "network backend 'none' is not compiled into this binary",
        ),
        ("set_link", {"name": "x"}, "GenericError", "Parameter 'up' is missing"),
        (
            "set_link", {"name": "x", "up": "yes"},
            "GenericError", "Invalid parameter type for 'up', expected: boolean",
        ),
        ("query-rx-filter", {"name": "zz"}, "GenericError", "invalid net client name: zz"),
        ("query-version", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ],
)
def test_error(daemon, command, arguments, cls, desc):
    """QEMU's error class and text for a bad command."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            return await expect_error(client, command, arguments)

    assert run(body()) == (cls, desc)


NOT_IMPLEMENTED = "its data path is not implemented in this version of netdevd"


@pytest.mark.parametrize(
    "arguments, why",
    [
        ({"type": "vde", "id": "x", "sock": "/tmp/vde.ctl"}, "netdevd has no VDE switch support"),
        (
            {"type": "netmap", "id": "x", "ifname": "vale0:1"},
            "netmap needs the out-of-tree netmap kernel module and /dev/netmap, which this host does not have",
        ),
        # vhost-user first needs its chardev: test_chardev.py checks its refusal with one.
        # vhost-vdpa is built: tests/tests/vhost_vdpa.rs checks a missing device's error.
        ({"type": "passt", "id": "x"}, NOT_IMPLEMENTED),
        ({"type": "vmnet-host", "id": "x"}, "vmnet is Apple's vmnet.framework and exists only on macOS"),
    ],
    ids=lambda value: value["type"] if isinstance(value, dict) else "",
)
def test_unavailable_types_are_refused_with_their_reason(daemon, arguments, why):
    """Valid forms of the types netdevd cannot create get the README's exact refusal, and nothing
    is created."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            error = await expect_error(client, "netdev_add", arguments)
            return error, await client.execute("x-query-netdevs")

    error, netdevs = run(body())
    assert error == ("GenericError", f"network backend '{arguments['type']}' is not available: {why}")
    assert netdevs == []


def test_errors_that_need_a_netdev(daemon):
    """Duplicate id and query-rx-filter on a netdev; the failed add changes nothing."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            assert await client.execute("netdev_add", HUBPORT) == {}
            assert await expect_error(client, "netdev_add", HUBPORT) == ("GenericError", "Duplicate ID 'n0'")
            # A duplicate of another type is still a duplicate.
            assert await expect_error(client, "netdev_add", {**HUBPORT, "hubid": 5}) == (
                "GenericError", "Duplicate ID 'n0'",
            )
            assert await expect_error(client, "query-rx-filter", {"name": "n0"}) == (
                "GenericError", "net client(n0) isn't a NIC",
            )
            assert await client.execute("query-rx-filter") == []
            netdevs = await client.execute("x-query-netdevs")
            assert [(n["id"], n["hubid"]) for n in netdevs] == [("n0", 0)]

    run(body())


def test_unavailable_type_creates_nothing(daemon):
    """A type netdevd cannot create (vde: no data path) fails with GenericError and adds nothing."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await client.execute("netdev_add", HUBPORT)
            before = await client.execute("x-query-netdevs")
            cls, desc = await expect_error(client, "netdev_add", {"type": "vde", "id": "v0"})
            assert cls == "GenericError" and desc
            assert await client.execute("x-query-netdevs") == before
            # The id is still free.
            await expect_error(client, "netdev_del", {"id": "v0"})

    run(body())


# --------------------------------------------------------------------------------------------
# 5. Events
# --------------------------------------------------------------------------------------------


def check_shutdown(event, reason: str, before: float, after: float) -> None:
    """A SHUTDOWN event with QEMU's data and a wall-clock timestamp taken in [before, after]."""
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": False, "reason": reason}
    stamp = event["timestamp"]
    assert type(stamp["seconds"]) is int and type(stamp["microseconds"]) is int
    assert 0 <= stamp["microseconds"] < 1_000_000
    when = stamp["seconds"] + stamp["microseconds"] / 1e6
    assert before - 1 <= when <= after + 1, (before, when, after)


def test_sigterm_sends_shutdown_to_every_client(daemon):
    """SIGTERM: every negotiated client gets SHUTDOWN(host-signal); the daemon exits 0."""

    async def body():
        async with qmp_client(daemon.socket_path, "a") as a, qmp_client(daemon.socket_path, "b") as b:
            before = time.time()
            daemon.terminate()
            events = [await asyncio.wait_for(c.events.get(), TIMEOUT) for c in (a, b)]
            return events, before, time.time()

    events, before, after = run(body())
    for event in events:
        check_shutdown(event, "host-signal", before, after)
    assert daemon.wait() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT], ids=lambda s: s.name)
def test_other_signals_shut_down(daemon, sig):
    """SIGINT stops the daemon like SIGTERM, with reason host-signal (SIGHUP reloads the
    configuration: test_operations.py)."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        daemon.terminate(sig)
        events = [json.loads(line) for line in qmp.read_until_eof()]
    assert [(e["event"], e["data"]["reason"]) for e in events] == [("SHUTDOWN", "host-signal")]
    assert daemon.wait() == 0


def test_quit_sends_shutdown_to_every_client(daemon):
    """quit: answered with {}, every client gets SHUTDOWN(host-qmp-quit); the daemon exits 0."""
    daemon.expect_exit()

    async def body():
        async with qmp_client(daemon.socket_path, "a") as a, qmp_client(daemon.socket_path, "b") as b:
            before = time.time()
            assert await a.execute("quit") == {}
            events = [await asyncio.wait_for(c.events.get(), TIMEOUT) for c in (a, b)]
            return events, before, time.time()

    events, before, after = run(body())
    for event in events:
        check_shutdown(event, "host-qmp-quit", before, after)
    assert daemon.wait() == 0


# --------------------------------------------------------------------------------------------
# 6. Concurrent clients
# --------------------------------------------------------------------------------------------


def test_concurrent_clients(daemon):
    """Five clients add and delete their own hubports at the same time; the graph ends right."""
    ports = 6

    async def worker(n: int) -> None:
        async with qmp_client(daemon.socket_path, f"c{n}") as client:
            for p in range(ports):
                await client.execute("netdev_add", {"type": "hubport", "id": f"c{n}p{p}", "hubid": n})
            for p in range(0, ports, 2):
                await client.execute("netdev_del", {"id": f"c{n}p{p}"})

    async def body():
        await asyncio.gather(*(worker(n) for n in range(5)))
        async with qmp_client(daemon.socket_path, "check") as client:
            netdevs = await client.execute("x-query-netdevs")
            await client.execute("set_link", {"name": "c0p1", "up": False})
            after_down = await client.execute("x-query-netdevs")
            await client.execute("set_link", {"name": "c0p1", "up": True})
            after_up = await client.execute("x-query-netdevs")
            return netdevs, after_down, after_up

    netdevs, after_down, after_up = run(body())
    expected = {(f"c{n}p{p}", n) for n in range(5) for p in range(1, ports, 2)}
    assert {(d["id"], d["hubid"]) for d in netdevs} == expected
    assert len(netdevs) == len(expected)
    assert all(d["type"] == "hubport" and d["link-up"] is True for d in netdevs)
    # Each client's ports are listed in its creation order.
    for n in range(5):
        assert [d["id"] for d in netdevs if d["hubid"] == n] == [f"c{n}p{p}" for p in range(1, ports, 2)]
    down = {d["id"]: d["link-up"] for d in after_down}
    assert down.pop("c0p1") is False and all(down.values())
    assert all(d["link-up"] for d in after_up)


def test_hubport_peering(daemon):
    """A hubport with netdev= peers both ends; deleting one unpeers the other."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await client.execute("netdev_add", {"type": "hubport", "id": "a", "hubid": 1})
            await client.execute("netdev_add", {"type": "hubport", "id": "b", "hubid": 2, "netdev": "a"})
            peered = {n["id"]: n.get("peer") for n in await client.execute("x-query-netdevs")}
            await client.execute("netdev_del", {"id": "b"})
            unpeered = {n["id"]: n.get("peer") for n in await client.execute("x-query-netdevs")}
            return peered, unpeered

    peered, unpeered = run(body())
    assert peered == {"a": "b", "b": "a"}
    assert unpeered == {"a": None}


# --------------------------------------------------------------------------------------------
# 7. File descriptors over SCM_RIGHTS
# --------------------------------------------------------------------------------------------


def test_getfd_and_closefd(daemon):
    """getfd names a passed fd; without one it fails; closefd releases the name once."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            with open(os.devnull, "rb") as passed:
                client.send_fd_scm(passed.fileno())
                assert await client.execute("getfd", {"fdname": "f"}) == {}
            assert await expect_error(client, "getfd", {"fdname": "f"}) == (
                "GenericError", "No file descriptor supplied via SCM_RIGHTS",
            )
            assert await client.execute("closefd", {"fdname": "f"}) == {}
            assert await expect_error(client, "closefd", {"fdname": "f"}) == (
                "GenericError", "File descriptor named 'f' not found",
            )

    run(body())


def test_getfd_replaces_a_name(daemon):
    """getfd with a name already in use replaces it: one closefd frees it."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            for _ in range(2):
                r, w = os.pipe()
                client.send_fd_scm(r)
                assert await client.execute("getfd", {"fdname": "same"}) == {}
                os.close(r)
                os.close(w)
            assert await client.execute("closefd", {"fdname": "same"}) == {}
            await expect_error(client, "closefd", {"fdname": "same"})

    run(body())


def test_getfd_digit_name_consumes_the_fd(daemon):
    """A name starting with a digit is refused, and QEMU closes the fd it received (monitor/fds.c)."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            with open(os.devnull, "rb") as passed:
                client.send_fd_scm(passed.fileno())
                assert await expect_error(client, "getfd", {"fdname": "1x"}) == (
                    "GenericError", "Parameter 'fdname' expects a name not starting with a digit",
                )
            # The fd was used up by the failed getfd: a new name gets nothing.
            assert await expect_error(client, "getfd", {"fdname": "g"}) == (
                "GenericError", "No file descriptor supplied via SCM_RIGHTS",
            )

    run(body())


def test_getfd_without_fd_checks_the_fd_first(daemon):
    """QEMU's qmp_getfd looks for the fd before it looks at the name."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            return await expect_error(client, "getfd", {"fdname": "1x"})

    assert run(body()) == ("GenericError", "No file descriptor supplied via SCM_RIGHTS")


def test_fds_are_per_connection(daemon):
    """A name given on one connection is unknown on another."""

    async def body():
        async with qmp_client(daemon.socket_path, "a") as a, qmp_client(daemon.socket_path, "b") as b:
            with open(os.devnull, "rb") as passed:
                a.send_fd_scm(passed.fileno())
                await a.execute("getfd", {"fdname": "f"})
            assert await expect_error(b, "closefd", {"fdname": "f"}) == (
                "GenericError", "File descriptor named 'f' not found",
            )
            assert await a.execute("closefd", {"fdname": "f"}) == {}

    run(body())


def test_getfd_with_legacy_client(daemon):
    """The synchronous client's send_fd_scm works the same way."""
    qmp = QEMUMonitorProtocol(daemon.socket_path)
    try:
        qmp.settimeout(TIMEOUT)
        qmp.connect()
        with open(os.devnull, "rb") as passed:
            qmp.send_fd_scm(passed.fileno())
            assert qmp.cmd("getfd", fdname="legacy") == {}
        assert qmp.cmd("closefd", fdname="legacy") == {}
    finally:
        qmp.close()


# --------------------------------------------------------------------------------------------
# 8. Hostile input
# --------------------------------------------------------------------------------------------

SMALL_LIMIT_CONFIG = "netdevs = []\n\n[qmp]\nmax-message-bytes = 4096\n"


def assert_answers_new_client(daemon) -> None:
    """The daemon is alive and serves a fresh connection."""
    assert daemon.proc.poll() is None, daemon.log()
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        assert "return" in qmp.cmd("query-version")


def test_oversized_message(start_daemon):
    """A message over max-message-bytes is refused with an error; the connection stays usable."""
    daemon = start_daemon(config=SMALL_LIMIT_CONFIG)
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send('{"execute": "query-version", "id": "' + "a" * (100 * 1024))
        qmp.send('"}\n{"execute": "query-version", "id": "after"}\n')
        errors = []
        while "id" not in (response := qmp.recv()):
            errors.append(response)
        assert response["id"] == "after" and "return" in response
        assert errors, "no error for the oversized message"
        for error in errors:
            assert error["error"]["class"] == "GenericError"
            assert "size limit" in error["error"]["desc"], error
        # A request just under the limit is still fine.
        big_id = "b" * 3000
        assert qmp.cmd("query-version", id=big_id)["id"] == big_id
    assert_answers_new_client(daemon)


def test_disconnect_mid_message(daemon):
    """Clients that hang up mid-request (or before reading the greeting) do no harm."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send('{"execute": "netdev_add", "arguments": {"type": "hub')
    with socket.socket(socket.AF_UNIX) as silent:
        silent.settimeout(TIMEOUT)
        silent.connect(daemon.socket_path)
        silent.sendall(b'{"execute": "qmp_capa')
    assert_answers_new_client(daemon)
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        assert qmp.cmd("x-query-netdevs") == {"return": []}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_garbage_input(daemon, seed):
    """Random bytes (invalid UTF-8 included) get only ASCII error lines without id; the daemon lives.

    The bytes come from a seeded generator so that a failure can be reproduced.
    """
    rng = random.Random(seed)
    garbage = rng.randbytes(64 * 1024) + b"\xff\xfe\xc0\x80\xed\xa0\x80\n" + b'{"execute": "\xff"}\n'
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(garbage)
        qmp.sock.shutdown(socket.SHUT_WR)
        lines = qmp.read_until_eof()  # each checked for CRLF
    assert lines, "no error for garbage input"
    for line in lines:
        assert line.isascii()
        response = json.loads(line)
        assert response.keys() == {"error"}, response
        assert response["error"]["class"] == "GenericError"
    assert_answers_new_client(daemon)


def test_invalid_utf8_in_string(daemon):
    """Invalid UTF-8 inside a JSON string is a parse error; the connection stays usable."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send(b'{"execute": "query-version", "id": "\xc3\x28"}\n')
        response = qmp.recv()
        assert response.keys() == {"error"}
        assert response["error"]["desc"].startswith("JSON parse error")
        assert qmp.cmd("query-version", id=1)["id"] == 1


# --------------------------------------------------------------------------------------------
# 9. Hardening (issue 15): duplicate keys, descriptor bounds, numeric fds, hostile clients
# --------------------------------------------------------------------------------------------


def test_duplicate_key_is_a_parse_error(daemon):
    """A repeated key is QEMU's `JSON parse error, duplicate key` (no id: the request never
    parsed), at any depth; the next request is answered."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send('{"execute": "query-version", "id": 1, "id": 2}\n')
        assert qmp.recv() == {"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}
        qmp.send('{"execute": "netdev_add", "arguments": {"type": "hubport", "id": "a", "id": "b", "hubid": 0}}')
        assert qmp.recv() == {"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}
        assert qmp.cmd("x-query-netdevs", id=3) == {"return": [], "id": 3}


def test_nesting_limit_is_qemus(daemon):
    """More than 1024 open brackets: QEMU's `JSON nesting depth limit exceeded`; the rest of the
    value is dropped and the connection goes on."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        qmp.send("[" * 1100 + "]" * 1100 + "\n")
        assert qmp.recv() == {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}
        assert qmp.cmd("query-version", id=1)["id"] == 1


def pipe_watch() -> tuple[int, int]:
    """(write end to send, read end that sees EOF once every copy of the write end is closed)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    return w, r


def closed_everywhere(read_end: int, deadline: float = 10.0) -> bool:
    """Whether every copy of the pipe's write end gets closed within `deadline` seconds (EOF)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if os.read(read_end, 1) == b"":
                return True
        except BlockingIOError:
            pass
        time.sleep(0.02)
    return False


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_too_many_fds_in_one_message_are_all_closed(daemon):
    """20 fds with one getfd: the control message is truncated at 16; the daemon closes every fd
    it got and getfd says why; nothing is named."""
    watches = [pipe_watch() for _ in range(20)]
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        send_with_fds(qmp.sock, b'{"execute": "getfd", "arguments": {"fdname": "f"}, "id": 1}', [w for w, _ in watches])
        for w, _ in watches:
            os.close(w)
        response = qmp.recv()
        assert response["id"] == 1
        assert response["error"]["desc"].startswith("Too many file descriptors in one message: at most 16"), response
        for _, r in watches:
            assert closed_everywhere(r), "the daemon kept a descriptor of a truncated message"
            os.close(r)
        assert qmp.cmd("closefd", {"fdname": "f"})["error"]["desc"] == "File descriptor named 'f' not found"


def test_unclaimed_fds_are_closed(daemon):
    """fds sent with a request that is not getfd are closed once a later request completes
    without claiming them (they cannot pile up)."""
    w, r = pipe_watch()
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        send_with_fds(qmp.sock, b'{"execute": "query-version", "id": 1}', [w])
        os.close(w)
        assert qmp.recv()["id"] == 1
        assert qmp.cmd("query-version", id=2)["id"] == 2
        assert closed_everywhere(r), "an fd sent without getfd stayed open in the daemon"
        os.close(r)


def test_numeric_fd_is_refused_over_qmp(daemon):
    """QEMU would take `fd: "N"` as any descriptor of its own process; netdevd refuses numbers
    from QMP clients (names from getfd only) and creates nothing."""
    for fd in ("0", "3", "9"):
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            response = qmp.cmd("netdev_add", {"type": "socket", "id": "s0", "fd": fd}, id="n")
            assert response == {
                "id": "n",
                "error": {
                    "class": "GenericError",
                    "desc": f"File descriptor number '{fd}' is refused over QMP: pass the descriptor with getfd and use its name",
                },
            }
            assert qmp.cmd("x-query-netdevs") == {"return": []}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hostile_clients_do_not_starve_others(daemon):
    """While thousands of clients connect and never read, some send requests a byte at a time,
    some pipeline requests without reading answers, and some flood descriptors (16 at a time
    without getfd, and 20 at a time, which truncates), a client connected before still gets its
    query-version answered (a generous 10 s: not answering is the failure), and so does a client
    that connects during the flood. Afterwards the daemon's descriptors are back to where they
    were and a new client is served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle_count = max(0, min(2000, hard - 300))
    assert idle_count >= 500, f"the open-files limit ({hard}) leaves too few descriptors for this test"
    probe = RawQmp(daemon.socket_path, negotiate=True)
    probe.sock.settimeout(10.0)
    baseline = fd_count(daemon.proc.pid)
    idle: list[socket.socket] = []
    busy: list[socket.socket] = []
    stop = threading.Event()
    donors = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    errors: list[BaseException] = []

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                s.connect(daemon.socket_path)
                return s
            except BlockingIOError:  # the listen backlog is full: the daemon is accepting
                if time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.001)

    def flood(byte_writers, pipeliners, fd_flooders) -> None:
        """Keeps every attacker busy until `stop`; one the daemon hangs up on just stops."""
        request = b'{"execute": "query-commands"}' * 200
        sends = [(s, lambda s: s.send(b"[" if random.random() < 0.5 else b'"')) for s in byte_writers]
        sends += [(s, lambda s: s.send(request)) for s in pipeliners]
        sends += [
            (s, lambda s, n=n: send_with_fds(s, b" ", donors[: 16 if n % 2 else 20])) for n, s in enumerate(fd_flooders)
        ]
        try:
            while not stop.is_set() and sends:
                for entry in list(sends):
                    s, send = entry
                    try:
                        send(s)
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        sends.remove(entry)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    try:
        for _ in range(idle_count):
            idle.append(connect())
        byte_writers = [connect() for _ in range(50)]
        pipeliners = [connect() for _ in range(20)]
        fd_flooders = [connect() for _ in range(20)]
        busy = byte_writers + pipeliners + fd_flooders
        for s in pipeliners + fd_flooders:
            s.setblocking(True)
            s.settimeout(TIMEOUT)
            s.sendall(b'{"execute": "qmp_capabilities"}')
            s.setblocking(False)
        attacker = threading.Thread(target=flood, args=(byte_writers, pipeliners, fd_flooders), daemon=True)
        attacker.start()
        for n in range(10):
            try:
                answer = probe.cmd("query-version", id=n)
            except socket.timeout:
                pytest.fail(f"query-version did not answer within 10 s during the flood (round {n})")
            assert answer["id"] == n and "return" in answer, answer
            time.sleep(0.2)
        # A client that comes during the flood is served too.
        try:
            with RawQmp(daemon.socket_path, negotiate=True) as late:
                late.sock.settimeout(10.0)
                assert late.cmd("query-version", id="late")["id"] == "late"
        except socket.timeout:
            pytest.fail("a new client was not answered within 10 s during the flood")
        assert not errors, errors
        assert daemon.proc.poll() is None, daemon.log()
    finally:
        stop.set()
        for s in idle + busy:
            s.close()
        for fd in donors:
            os.close(fd)
    attacker.join(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    # At most the baseline: a connection of the start-up readiness check may still have been open
    # when it was taken, and closes on the daemon's schedule.
    while fd_count(daemon.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fd_count(daemon.proc.pid) <= baseline, "the daemon holds descriptors of clients that left"
    assert probe.cmd("query-version", id="after")["id"] == "after"
    probe.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert_answers_new_client(daemon)
