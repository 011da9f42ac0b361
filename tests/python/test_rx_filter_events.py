"""NIC receive filters over QMP with QEMU's own Python client: NIC_RX_FILTER_CHANGED arming,
query-rx-filter's initial state and its per-model behaviour.

References: /work/shared/reference/qemu-netdev.md §6.4 (query-rx-filter mapping) and §6.5
(NIC_RX_FILTER_CHANGED: emitted on the first change, then silent for that NIC until
query-rx-filter has reported it).

The daemon of the `daemon` fixture runs in the test's own network namespace (the host's), so NICs
sit behind hubports without an interface, except in the one test that uses a tap with a unique
name (removed by netdev_del, and by the daemon's shutdown at the latest).
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest
from qemu.qmp import ExecuteError

from harness import TIMEOUT, qmp_client, run

EVENT = "NIC_RX_FILTER_CHANGED"

_names = itertools.count()


def unique(prefix: str) -> str:
    """A name unique across test processes, short enough for an interface (15 bytes)."""
    return f"{prefix}{os.getpid()}x{next(_names)}"


def event_data(name: str) -> dict:
    """QEMU's NIC_RX_FILTER_CHANGED data for NIC `name` (its QOM path under /machine/peripheral)."""
    return {"name": name, "path": f"/machine/peripheral/{name}/virtio-backend"}


async def add_nic(client, nic: str, **options) -> str:
    """A hubport on a hub of its own and NIC `nic` behind it; returns the hubport's id."""
    port = unique("hp")
    hubid = next(_names) + 100
    await client.execute("netdev_add", {"type": "hubport", "id": port, "hubid": hubid})
    await client.execute("netdev_add", {"type": "nic", "id": nic, "netdev": port, **options})
    return port


async def set_filter(client, name: str, **change) -> None:
    """x-set-rx-filter with QAPI member names (underscores become dashes)."""
    arguments = {"name": name, **{key.replace("_", "-"): value for key, value in change.items()}}
    await client.execute("x-set-rx-filter", arguments)


async def expect_error(client, command: str, arguments: dict) -> tuple[str, str]:
    """Runs a command that must fail; returns (class, desc)."""
    with pytest.raises(ExecuteError) as info:
        await client.execute(command, arguments)
    return info.value.error.error.class_, info.value.error.error.desc


#: Names of the marker NICs `expect_silence` makes; their events go to every client.
MARKER = "mk"


async def next_event(client, timeout: float = TIMEOUT, *, marker: str | None = None) -> dict:
    """The next event this client receives, skipping the events of marker NICs other than
    `marker` (another client's silence checks); fails after `timeout` seconds."""
    while True:
        try:
            event = await asyncio.wait_for(client.events.get(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no event within {timeout} s") from None
        name = event.get("data", {}).get("name", "")
        if name.startswith(MARKER) and name != marker:
            continue
        return event


async def expect_events(client, names: list[str]) -> None:
    """Exactly one NIC_RX_FILTER_CHANGED per NIC in `names` (any order), then silence."""
    got = []
    for _ in names:
        event = await next_event(client)
        assert event["event"] == EVENT, event
        stamp = event["timestamp"]
        assert type(stamp["seconds"]) is int and 0 <= stamp["microseconds"] < 1_000_000, stamp
        got.append(event["data"])
    key = lambda data: data["name"]  # noqa: E731
    assert sorted(got, key=key) == sorted((event_data(n) for n in names), key=key)
    await expect_silence(client)


async def expect_silence(client) -> None:
    """No event is pending: a marker NIC's first filter change, made now, must be the next event
    (a client gets its events in order, so one emitted earlier would come first). The marker NIC
    has a MAC outside QEMU's default range (it takes no default index) and is deleted again."""
    marker = unique(MARKER)
    port = await add_nic(client, marker, macaddr="02:00:00:00:00:fe")
    try:
        await set_filter(client, marker, promiscuous=False)
        event = await next_event(client, marker=marker)
        assert event["event"] == EVENT and event["data"] == event_data(marker), f"unexpected event: {dict(event)}"
    finally:
        await client.execute("netdev_del", {"id": marker})
        await client.execute("netdev_del", {"id": port})


async def query(client, name: str | None = None) -> list:
    return await client.execute("query-rx-filter", {} if name is None else {"name": name})


# --------------------------------------------------------------------------------------------
# NIC_RX_FILTER_CHANGED
# --------------------------------------------------------------------------------------------


def test_first_change_emits_once_until_queried(daemon):
    """One event on the first change; silence after it until query-rx-filter name=X re-arms."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await add_nic(client, "nic0")
            await expect_silence(client)  # creating a NIC is no filter change
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])
            # Further changes are silent, whatever they change (or whether they change anything).
            await set_filter(client, "nic0", multicast="all")
            await set_filter(client, "nic0", vlan_table=[1, 2], unicast_table=["02:00:00:00:00:01"])
            await set_filter(client, "nic0", multicast="all")
            await expect_silence(client)
            # query-rx-filter reports the NIC: the next change emits again, once.
            [info] = await query(client, "nic0")
            assert info["promiscuous"] is False and info["multicast"] == "all", info
            await set_filter(client, "nic0", broadcast_allowed=False)
            await expect_events(client, ["nic0"])
            await set_filter(client, "nic0", promiscuous=True)
            await expect_silence(client)
            # A change to exactly the same state still counts as a change (QEMU notifies after every
            # successful control command).
            await query(client, "nic0")
            await set_filter(client, "nic0", promiscuous=True)
            await expect_events(client, ["nic0"])

    run(body())


def test_query_without_name_rearms_every_nic(daemon):
    """query-rx-filter without a name re-arms every NIC it reported."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await add_nic(client, "nic0")
            await add_nic(client, "nic1")
            await set_filter(client, "nic0", promiscuous=False)
            await set_filter(client, "nic1", promiscuous=False)
            await expect_events(client, ["nic0", "nic1"])
            await set_filter(client, "nic0", unicast="none")
            await set_filter(client, "nic1", unicast="none")
            await expect_silence(client)
            infos = await query(client)
            assert [i["name"] for i in infos] == ["nic0", "nic1"], infos
            await set_filter(client, "nic0", unicast="normal")
            await set_filter(client, "nic1", unicast="normal")
            await expect_events(client, ["nic0", "nic1"])

    run(body())


def test_events_are_per_nic(daemon):
    """A disarmed NIC does not silence another; querying one NIC re-arms only that one."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await add_nic(client, "nic0")
            await add_nic(client, "nic1")
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])
            await set_filter(client, "nic0", promiscuous=True)
            await expect_silence(client)
            # nic0 is disarmed; nic1 still reports its first change.
            await set_filter(client, "nic1", promiscuous=False)
            await expect_events(client, ["nic1"])
            # Querying nic1 re-arms nic1 only.
            await query(client, "nic1")
            await set_filter(client, "nic0", promiscuous=False)
            await set_filter(client, "nic1", promiscuous=True)
            await expect_events(client, ["nic1"])

    run(body())


def test_failed_change_neither_emits_nor_disarms(daemon):
    """A rejected x-set-rx-filter emits nothing and leaves the NIC armed and its filter unchanged;
    failed queries re-arm nothing."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            port = await add_nic(client, "nic0")
            before = await query(client, "nic0")
            for change in (
                {"vlan-table": [4096]},
                {"promiscuous": False, "unicast-table": ["02:00:00:00:00:zz"]},
                {"main-mac": "52:54:00:12:34"},
                {"unicast": "bogus"},
            ):
                cls, desc = await expect_error(client, "x-set-rx-filter", {"name": "nic0", **change})
                assert cls == "GenericError" and desc, (change, cls, desc)
                assert await query(client, "nic0") == before, change
            await expect_silence(client)
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])
            # Failed query-rx-filter calls re-arm nothing.
            assert await expect_error(client, "query-rx-filter", {"name": port}) == (
                "GenericError",
                f"net client({port}) isn't a NIC",
            )
            assert await expect_error(client, "query-rx-filter", {"name": "nosuch"}) == (
                "GenericError",
                "invalid net client name: nosuch",
            )
            await set_filter(client, "nic0", promiscuous=True)
            await expect_silence(client)
            # Neither do x-set-rx-filter errors on names that are no NIC.
            assert await expect_error(client, "x-set-rx-filter", {"name": port, "promiscuous": True}) == (
                "GenericError",
                f"net client({port}) isn't a NIC",
            )
            assert await expect_error(client, "x-set-rx-filter", {"name": "nosuch"}) == (
                "GenericError",
                "invalid net client name: nosuch",
            )
            await expect_silence(client)

    run(body())


def test_event_reaches_every_client(daemon):
    """Every negotiated client gets the event; the arming is the NIC's, not the client's."""

    async def body():
        async with qmp_client(daemon.socket_path, "a") as a, qmp_client(daemon.socket_path, "b") as b:
            await add_nic(a, "nic0")
            await set_filter(a, "nic0", promiscuous=False)
            await expect_events(a, ["nic0"])
            await expect_events(b, ["nic0"])
            # A query from client b re-arms the NIC for everyone.
            await query(b, "nic0")
            await set_filter(a, "nic0", promiscuous=True)
            await expect_events(a, ["nic0"])
            await expect_events(b, ["nic0"])

    run(body())


def test_recreated_nic_starts_armed(daemon):
    """A NIC deleted while disarmed and created again with the same id reports its first change."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            port = await add_nic(client, "nic0")
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])
            await client.execute("netdev_del", {"id": "nic0"})
            await client.execute("netdev_add", {"type": "nic", "id": "nic0", "netdev": port})
            [info] = await query(client, "nic0")
            assert info["promiscuous"] is True, "a new NIC starts from QEMU's initial state"
            # That query re-armed it anyway; delete and re-create once more without querying.
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])
            await client.execute("netdev_del", {"id": "nic0"})
            await client.execute("netdev_add", {"type": "nic", "id": "nic0", "netdev": port})
            await set_filter(client, "nic0", promiscuous=False)
            await expect_events(client, ["nic0"])

    run(body())


def test_nic_behind_a_tap(daemon):
    """A NIC behind a real tap backend: the same event and query behaviour."""
    tap = unique("nr")

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await client.execute(
                "netdev_add", {"type": "tap", "id": tap, "ifname": tap, "script": "no", "downscript": "no"}
            )
            try:
                await client.execute("netdev_add", {"type": "nic", "id": "nic0", "netdev": tap})
                [info] = await query(client, "nic0")
                assert info["name"] == "nic0" and info["main-mac"] == "52:54:00:12:34:56", info
                await set_filter(client, "nic0", promiscuous=False, multicast_table=["01:00:5e:00:00:01"])
                await expect_events(client, ["nic0"])
                [info] = await query(client, "nic0")
                assert info["promiscuous"] is False and info["multicast-table"] == ["01:00:5e:00:00:01"], info
                await set_filter(client, "nic0", promiscuous=True)
                await expect_events(client, ["nic0"])
                # The tap itself is no NIC.
                assert await expect_error(client, "query-rx-filter", {"name": tap}) == (
                    "GenericError",
                    f"net client({tap}) isn't a NIC",
                )
                await client.execute("netdev_del", {"id": "nic0"})
            finally:
                await client.execute("netdev_del", {"id": tap})
            assert await query(client) == []

    run(body())
    assert not os.path.exists(f"/sys/class/net/{tap}"), f"netdev_del removed the tap {tap}"


# --------------------------------------------------------------------------------------------
# query-rx-filter
# --------------------------------------------------------------------------------------------


def test_fresh_nic_reports_qemus_initial_state(daemon):
    """Before any change a NIC reports what QEMU reports before a guest driver loads."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            assert await query(client) == []
            await add_nic(client, "nic0")
            await add_nic(client, "nic1", macaddr="02:AB:cd:00:00:01")
            return await query(client, "nic0"), await query(client)

    [nic0], every = run(body())
    assert nic0 == {
        "promiscuous": True,
        "name": "nic0",
        "main-mac": "52:54:00:12:34:56",
        "unicast": "normal",
        "vlan": "all",
        "vlan-table": list(range(4095, -1, -1)),
        "unicast-table": [],
        "multicast": "normal",
        "multicast-overflow": False,
        "unicast-overflow": False,
        "multicast-table": [],
        # QEMU's inverted report: false while broadcast is allowed.
        "broadcast-allowed": False,
    }
    # Member order as QEMU writes RxFilterInfo (virtio_net_query_rxfilter).
    assert list(nic0) == [
        "promiscuous", "name", "main-mac", "unicast", "vlan", "vlan-table", "unicast-table",
        "multicast", "multicast-overflow", "unicast-overflow", "multicast-table", "broadcast-allowed",
    ]
    assert [i["name"] for i in every] == ["nic0", "nic1"]
    assert every[0] == nic0
    # An explicit MAC is reported lower case.
    assert every[1]["main-mac"] == "02:ab:cd:00:00:01"


def test_reported_mapping_after_changes(daemon):
    """QEMU's mapping: inverted broadcast-allowed, lists in reverse, vlan none/normal/all."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await add_nic(client, "nic0")
            await set_filter(
                client, "nic0", promiscuous=False, multicast="none", unicast="all",
                broadcast_allowed=False, main_mac="02:00:00:00:00:AA", vlan_table=[7, 3, 100],
                unicast_table=["02:00:00:00:00:01", "02:00:00:00:00:02"],
                multicast_table=["01:00:5e:00:00:01", "33:33:00:00:00:01"],
            )
            [changed] = await query(client, "nic0")
            await set_filter(client, "nic0", vlan="none")
            [no_vlans] = await query(client, "nic0")
            await set_filter(client, "nic0", vlan="all", broadcast_allowed=True)
            [all_vlans] = await query(client, "nic0")
            return changed, no_vlans, all_vlans

    changed, no_vlans, all_vlans = run(body())
    assert changed == {
        "promiscuous": False,
        "name": "nic0",
        "main-mac": "02:00:00:00:00:aa",
        "unicast": "all",
        "vlan": "normal",
        "vlan-table": [100, 7, 3],
        "unicast-table": ["02:00:00:00:00:02", "02:00:00:00:00:01"],
        "multicast": "none",
        "multicast-overflow": False,
        "unicast-overflow": False,
        "multicast-table": ["33:33:00:00:00:01", "01:00:5e:00:00:01"],
        "broadcast-allowed": True,  # QEMU reports nobcast
    }
    assert (no_vlans["vlan"], no_vlans["vlan-table"]) == ("none", [])
    assert (all_vlans["vlan"], len(all_vlans["vlan-table"])) == ("all", 4096)
    assert all_vlans["broadcast-allowed"] is False


def test_non_virtio_model_is_skipped_or_refused(daemon):
    """A NIC with model=e1000 has no filter QEMU can report: skipped without a name, an error
    with one; virtio models are reported."""

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            await add_nic(client, "nic0")
            await add_nic(client, "e0", model="e1000")
            await add_nic(client, "v1", model="virtio-net-pci")
            infos = await query(client)
            assert [i["name"] for i in infos] == ["nic0", "v1"], infos
            assert await expect_error(client, "query-rx-filter", {"name": "e0"}) == (
                "GenericError",
                "net client(e0) doesn't support rx-filter querying",
            )
            cls, desc = await expect_error(client, "x-set-rx-filter", {"name": "e0", "promiscuous": False})
            assert cls == "GenericError" and "e0" in desc, desc
            await expect_silence(client)

    run(body())
