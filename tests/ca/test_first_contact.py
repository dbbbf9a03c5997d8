"""First contacts in arrival order (`ca.first_contact`): leases, their lapse, and the
wait for a whole ClientHello, on trio's virtual clock and on real loopback sockets."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.first_contact import FirstContacts, first_record, peer_gone


async def test_leases_are_granted_in_arrival_order_and_never_more_than_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    contacts = FirstContacts(2, expiry=100)
    granted: dict[int, float] = {}

    async def contact(n: int) -> None:
        lease = await contacts.acquire()
        granted[n] = trio.current_time()
        assert contacts.held <= 2
        await trio.sleep(1)
        contacts.release(lease)

    async with trio.open_nursery() as nursery:
        for n in range(7):
            nursery.start_soon(contact, n)
            await trio.sleep(0.01)  # arrive in this order
    # Two turns freed at once are granted together (and resume in trio's order).
    assert [round(granted[n], 2) for n in range(7)] == [0, 0.01, 1, 1.01, 2, 2.01, 3]
    assert trio.current_time() == pytest.approx(4.0, abs=0.1)  # 7 one-second turns, 2 at once
    assert (contacts.granted, contacts.lapsed, contacts.held, contacts.waiting) == (7, 0, 0, 0)


async def test_a_stalled_holder_keeps_its_lease_only_until_it_lapses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    contacts = FirstContacts(1, expiry=2)
    stalled = await contacts.acquire()  # a ClientHello, then nothing more
    waited = trio.current_time()
    second = await contacts.acquire()
    assert trio.current_time() - waited == pytest.approx(2)
    assert contacts.lapsed == 1
    contacts.release(stalled)  # lapsed already: gives nothing back twice
    assert contacts.held == 1
    contacts.release(second)
    assert contacts.held == 0


async def test_a_waiter_that_gives_up_leaves_the_line_and_the_next_one_is_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    contacts = FirstContacts(1, expiry=100)
    first = await contacts.acquire()
    order: list[str] = []

    async def impatient() -> None:
        with trio.move_on_after(1):
            await contacts.acquire()
            order.append("impatient")  # pragma: no cover - it gives up first

    async def patient() -> None:
        lease = await contacts.acquire()
        order.append("patient")
        contacts.release(lease)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        await trio.sleep(0.1)
        nursery.start_soon(patient)
        await trio.sleep(5)
        assert contacts.waiting == 1  # the impatient one left; the patient one waits
        contacts.release(first)
    assert order == ["patient"]
    assert (contacts.held, contacts.waiting) == (0, 0)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 4),
    expiry=st.integers(1, 5),
    arrivals=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8)), min_size=1, max_size=25),
)
def test_leases_hold_their_promises_for_any_arrivals(
    count: int, expiry: int, arrivals: list[tuple[int, int]]
) -> None:
    """Whatever the arrivals and hold times: never more than ``count`` leases in force,
    granted in arrival order (a lease's id is its place in line: an earlier one is never
    granted later), and nobody waits while a lease is free."""
    grants: dict[int, float] = {}

    async def main() -> None:
        contacts = FirstContacts(count, float(expiry))

        async def contact(n: int, hold: int) -> None:
            lease = await contacts.acquire()
            grants[lease] = trio.current_time()  # virtual time: the instant it was granted
            assert contacts.held <= count
            await trio.sleep(hold)
            contacts.release(lease)

        async def watch() -> None:
            while True:
                await trio.testing.wait_all_tasks_blocked()
                assert contacts.waiting == 0 or contacts.held == count
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as arriving:
                for n, (gap, hold) in enumerate(arrivals):
                    await trio.sleep(gap)
                    arriving.start_soon(contact, n, hold)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(grants) == len(arrivals)
    times = [grants[lease] for lease in sorted(grants)]
    assert times == sorted(times)


# -- the wait for a whole ClientHello, on real sockets ----------------------------------


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def _record(body: bytes) -> bytes:
    return bytes([0x16, 3, 1]) + len(body).to_bytes(2, "big") + body


async def test_first_record_waits_for_the_whole_clienthello_without_spinning() -> None:
    server, client = _pair()
    hello = _record(b"\x01" + b"x" * 1500)
    with server, client:
        ours = trio.socket.from_stdlib_socket(server)
        client.sendall(hello[:3])  # not even the header
        with trio.move_on_after(0.3) as waiting:
            await first_record(ours)
        assert waiting.cancelled_caught
        client.sendall(hello[3:700])
        with trio.move_on_after(0.3) as waiting:
            await first_record(ours)
        assert waiting.cancelled_caught
        client.sendall(hello[700:])
        with trio.fail_after(5):
            await first_record(ours)
        # Nothing was read: the handshake gets every byte, and reads wake at one again.
        assert server.recv(len(hello) + 10, socket.MSG_PEEK) == hello
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\xff\xff", b""])
async def test_first_record_returns_at_once_for_what_is_no_clienthello(sent: bytes) -> None:
    """Plain HTTP, a record longer than TLS allows, or a peer that closed: the handshake
    fails on its own, so there is nothing to wait for."""
    server, client = _pair()
    with server, client:
        client.sendall(sent)
        if not sent:
            client.shutdown(socket.SHUT_WR)
        with trio.fail_after(5):
            await first_record(trio.socket.from_stdlib_socket(server))


def test_peer_gone_tells_a_closed_peer_from_a_waiting_one() -> None:
    server, client = _pair()
    with server:
        ours = trio.socket.from_stdlib_socket(server)
        client.sendall(_record(b"\x01hello"))
        assert not peer_gone(ours)  # a whole ClientHello waiting to be read
        client.close()
        assert peer_gone(ours)
