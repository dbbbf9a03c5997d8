"""A fleet of simulated agents against one real CA: what a change, a renewal and a herd cost.

Starts a real `tally ca run` (its own process, so its CPU and memory are its
own) and N simulated agents, sharded over simulator processes of ``--per-shard``
agents each (each under the descriptor limit, together on every core; their CPU
is reported apart from the CA's).  Each simulated agent is an agent as the CA
sees it: its own join token (made through the admin socket), its own key and
agent SVID, mutual TLS with the real client (`agent.ca_client.CAClient`, pooled
connections closed after 5 s idle, as the agent has them), and the real agent's
loops: one parked entries long poll with delta sync (`agent.renewal.EntrySync`)
that also brings a new bundle, renewal of its own SVID, and renewal of its W
workloads' SVIDs in one batch, each at a random point before half-life
(`tally.spiffe.rotation`).  Lifetimes are compressed: ``--ttl 60`` makes an
hour pass in a minute, so the CA sees the renewals of 60 times as many agents
at 1 h; the polls come every ``poll_wait`` (50 s) whatever the TTL.

Phases: attest everyone, run steady for ``--seconds`` (the table's steady
figures), make one entry change (what it wakes), then two herds.  Every agent
restarts at once as the real agent does (its own SVID kept, its entries synced
anew, its workload SVIDs signed anew), and the clock runs until each holds all its
workload SVIDs again; then the CA restarts on the same port and data, and the clock
runs until every agent's poll is parked there again.

    .venv/bin/python -m bench.fleet --agents 100,1000 [--workloads 10] [--ttl 60]
    .venv/bin/python -m bench.fleet --agents 10000 --ttl 3600 --steady-start --spread 120
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from agent import keeper, renewal
from agent.ca_client import CAClient, CAError, make_csr
from agent.renewal import Entry, EntrySync
from agent.settings import AgentSettings
from bench.ca_daemon import TRUST_DOMAIN
from tally.app.launch import Daemon
from tally.ops import collector
from tally.ops.config import Address
from tally.spiffe import pem, rotation, x509profile
from tally.spiffe.spiffeid import TrustDomain
from tally.wire import http

TD = TrustDomain.parse(TRUST_DOMAIN)
POLL_WAIT = 50.0
"""The agent's default ``poll_wait``."""
ENTRY_WAKES = 'tally_ca_poll_wakeups_total{cause="entry"}'
RENEWAL_WAKES = 'tally_ca_poll_wakeups_total{cause="renewal"}'


def ca_pid_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used, RSS in KiB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return cpu, rss


def tree_cpu(pid: int) -> float:
    """CPU seconds used by ``pid`` and every process under it (the CA's signing workers
    are children of its forkserver)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0.0
    for p in tree:
        try:
            total += ca_pid_stats(p)[0]
        except OSError:
            continue
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Admin:
    """The admin API over its Unix socket, as `tally ca` calls it."""

    def __init__(self, path: str) -> None:
        async def connect() -> trio.abc.Stream:
            return await trio.open_unix_socket(path)

        self.http = http.HttpClient(connect)

    async def call(self, method: str, target: str, body: object = None) -> Any:
        resp = await self.http.request(method, target, json_body=body, timeout=120)
        if resp.status >= 300:
            raise RuntimeError(f"admin {method} {target}: {resp.status} {resp.body[:200]!r}")
        return resp.json()

    async def metrics(self, address: str) -> dict[str, float]:
        host, port = address.rsplit(":", 1)

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, int(port))

        client = http.HttpClient(connect)
        resp = await client.request("GET", "/metrics", timeout=30)
        await client.aclose()
        out: dict[str, float] = {}
        for line in resp.body.decode().splitlines():
            if line.startswith("tally_ca_") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
                base = name.split("{", 1)[0]
                if base != name:  # labelled samples also count toward their total
                    out[base] = out.get(base, 0.0) + float(value)
        return out


@dataclass
class Stats:
    renew_ms: list[float] = field(default_factory=list)
    sign_ms: list[float] = field(default_factory=list)
    renewals: int = 0
    batches: int = 0
    """Workload signing calls (each a batch of the agent's CSRs)."""
    polls: int = 0
    """Entries polls answered (each one round trip to the CA)."""
    signed: int = 0
    overloaded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    why: Counter[str] = field(default_factory=Counter)
    """Errors by their message, addresses cut out: what ``errors`` counts, in words."""

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, CAError) and exc.status == 429:
            self.overloaded += 1
            return
        self.errors[exc.code if isinstance(exc, CAError) else type(exc).__name__] += 1
        self.why[re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", str(exc))[:120]] += 1


CA_TIMEOUT = float(AgentSettings.ca_timeout)
"""A call's deadline, the real agent's default: in a herd, an agent still in the CA's
line when it runs out gives up its place and comes back after its backoff."""


class SimAgent:
    """One simulated agent: its own identity and the agent's loops, nothing served."""

    def __init__(self, n: int, ca: Address, roots: list[Any], csr: str, stats: Stats) -> None:
        self.n = n
        self.ca = ca
        self.roots = roots
        self.csr = csr  # workload CSRs: the CA checks and signs them; one key does for all
        self.stats = stats
        self.rng = random.Random(n)
        self.key = x509profile.generate_key()
        self.client = CAClient(ca, TD, roots, timeout=CA_TIMEOUT)
        self.sync = EntrySync()
        self.entries: dict[str, Entry] = {}
        self.identity: tuple[Any, Any] | None = None
        self.renew_at = 0.0  # trio time
        self.workloads_at = 0.0
        self.fresh = trio.Event()  # set when agent SVID and workload SVIDs were renewed
        self.entries_in = trio.Event()  # wakes the renewal loop when entries arrive
        self.sign_settled = trio.Event()  # set after each signing call, answered or failed
        self.bundle_sequence = -1
        self.mid_life = False
        """Draw the first renewals as a fleet up for a while has them (``--steady-start``)."""
        self._first_sign = True

    async def attest(self, token: str) -> None:
        issued, _, sequence = await self.client.attest(token, self.key)
        self.client.set_identity(issued.chain, self.key)
        self.identity = (issued.chain, self.key)
        self.bundle_sequence = sequence
        self.renew_at = self._when(issued.chain[0], first=True)

    def _when(self, leaf: Any, *, first: bool = False) -> float:
        """When to renew ``leaf``, on trio's clock.  With `mid_life`, a first renewal
        falls uniformly within one mean renewal interval, so renewals arrive at the
        steady rate from the start instead of after a third of a lifetime."""
        life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        if first and self.mid_life:
            return trio.current_time() + self.rng.uniform(0, life * sum(rotation.WINDOW) / 2)
        at = rotation.renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc, self.rng)
        return trio.current_time() + (at - datetime.now(UTC)).total_seconds()

    async def _retry_pause(self, exc: Exception, attempt: int) -> None:
        """The agent's own retry delay (`agent.renewal.retry_cap`, `honor_retry_after`):
        backoff capped by the time its SVID has left, at least what the CA asked."""
        now = datetime.now(UTC)
        soonest = now if self.identity is None else self.identity[0][0].not_valid_after_utc
        cap = renewal.retry_cap(now, soonest, someone_waits=not self.entries)
        delay = rotation.backoff(attempt, self.rng, cap=cap)
        told = exc.retry_after if isinstance(exc, CAError) else None
        await trio.sleep(renewal.honor_retry_after(delay, told, now, soonest, self.rng))

    async def entries_loop(self) -> None:
        """The agent's one parked poll: entries by delta sync, and the bundle with them."""
        attempt = 0
        while True:
            since, after, park = self.sync.request()
            try:
                page = await self.client.entries_sync(
                    since=since,
                    wait=POLL_WAIT if park else 0,
                    after=after,
                    bundle=self.bundle_sequence,
                )
            except (CAError, trio.TooSlowError) as exc:
                self.stats.failed(exc)
                attempt += 1
                await self._retry_pause(exc, attempt)
                continue
            attempt = 0
            self.stats.polls += 1
            if page.bundle is not None:
                self.bundle_sequence = page.bundle.sequence
            change = self.sync.receive(self.entries, page)
            if change is not None:
                self.entries = change.entries
                if change.changed and self.sync.request()[2] and self._signing_due():
                    # As the real agent (`agent.keeper` rule 6): sign, then park, so the
                    # signing call takes the connection this poll leaves idle.
                    self.sign_settled = trio.Event()
                    self.entries_in.set()
                    with trio.move_on_after(keeper.SIGN_BEFORE_PARK_S):
                        await self.sign_settled.wait()

    def _signing_due(self) -> bool:
        """Just joined or restarted: no workload SVID signed yet."""
        return not self.fresh.is_set()

    async def renew_loop(self) -> None:
        attempt = 0
        while True:
            with trio.move_on_at(min(self.renew_at, self.workloads_at)):
                await self.entries_in.wait()
                self.workloads_at = trio.current_time()  # entries to sign have arrived
            self.entries_in = trio.Event()
            now = trio.current_time()
            if self.workloads_at == math.inf and self.entries:  # they came as it woke
                self.workloads_at = now
            try:
                if self.renew_at <= now:
                    t0 = time.perf_counter()
                    key = x509profile.generate_key()
                    issued = await self.client.renew(key)
                    self.stats.renew_ms.append((time.perf_counter() - t0) * 1000)
                    self.stats.renewals += 1
                    self.client.set_identity(issued.chain, key)
                    self.identity = (issued.chain, key)
                    self.renew_at = self._when(issued.chain[0])
                if self.workloads_at <= trio.current_time() and self.entries:
                    t0 = time.perf_counter()
                    results = await self.client.sign([(e, self.csr) for e in self.entries])
                    self.stats.sign_ms.append((time.perf_counter() - t0) * 1000)
                    self.stats.batches += 1
                    chains = [r["chain"] for r in results if "chain" in r]
                    self.stats.signed += len(chains)
                    if len(chains) != len(results):
                        self.stats.errors["not_signed"] += len(results) - len(chains)
                    if chains:
                        if self._first_sign:
                            # One draw for the batch: the soonest of 10 draws within one
                            # mean interval would come ten times too soon (`mid_life`).
                            self._first_sign = False
                            self.workloads_at = self._when(chains[0][0], first=True)
                        else:
                            self.workloads_at = min(self._when(c[0]) for c in chains)
                    self.fresh.set()
                    self.sign_settled.set()
                elif not self.entries:
                    # Entries not synced yet: their arrival wakes this loop, as it does the
                    # agent's minter.  (A check every 0.5 s here was a third of the
                    # simulators' CPU in a herd, while 10,000 agents waited their turn.)
                    self.workloads_at = math.inf
            except (CAError, trio.TooSlowError) as exc:
                self.stats.failed(exc)
                self.sign_settled.set()  # backing off holds no connection
                attempt += 1
                await self._retry_pause(exc, attempt)
                continue
            attempt = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.entries_loop)
            nursery.start_soon(self.renew_loop)
            nursery.start_soon(self.client.close_idle)

    async def reconnect(self) -> None:
        """As the real agent restarts: every connection dropped, its own SVID kept (it is
        on disk, renewed on its schedule), its entries synced from nothing and every
        workload SVID signed anew (workload keys live only in memory)."""
        await self.client.aclose()
        assert self.identity is not None
        self.client = CAClient(self.ca, TD, self.roots, timeout=CA_TIMEOUT)
        self.client.set_identity(*self.identity)
        self.sync = EntrySync()
        self.entries = {}
        self.fresh = trio.Event()
        self.workloads_at = trio.current_time()


async def parked_connection_kib(agent: SimAgent, pid: int, count: int) -> float:
    """RSS the CA adds per extra mTLS connection holding a parked long poll."""
    assert agent.identity is not None
    clients = []
    for _ in range(count):
        client = CAClient(agent.ca, TD, agent.roots, timeout=60)
        client.set_identity(*agent.identity)
        clients.append(client)
    _, before = ca_pid_stats(pid)
    fds = open_fds(pid)
    poll = partial(
        CAClient.entries_sync, since=agent.sync.revision, wait=20, bundle=agent.bundle_sequence
    )
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(poll, client)
        for _ in range(300):  # the CA's descriptors tell when all are connected (60 s at most)
            if open_fds(pid) >= fds + count:
                break
            await trio.sleep(0.2)
        await trio.sleep(2)
        _, after = ca_pid_stats(pid)
        nursery.cancel_scope.cancel()
    for client in clients:
        await client.aclose()
    return (after - before) / count


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def register_fleet(
    admin: Admin, count: int, workloads: int, token_ttl: int = 3600
) -> tuple[list[str], list[str]]:
    """A join token per agent, good for ``token_ttl`` seconds (longer than the join
    spread), and ``workloads`` entries under each (in batches of 1,000); returns the
    tokens and the agents' SPIFFE IDs, agent 0 first."""
    tokens, ids = [], []
    for _ in range(count):
        made = await admin.call("POST", "/v1/tokens", {"ttl": token_ttl})
        tokens.append(made["token"])
        ids.append(made["spiffe_id"])
    specs = [
        {
            "spiffe_id": f"spiffe://{TRUST_DOMAIN}/a{a}/w{w}",
            "parent_id": ids[a],
            "selectors": [f"unix:uid:{1000 + w}"],
        }
        for a in range(count)
        for w in range(workloads)
    ]
    for start in range(0, len(specs), 1000):
        await admin.call("POST", "/v1/entries/batch", {"entries": specs[start : start + 1000]})
    return tokens, ids


def joiner(
    spread: float, stats: Stats, at_once: int = 64, seed: int = 0
) -> Callable[[SimAgent, str], Awaitable[None]]:
    """How each simulated agent joins: after a random pause of up to ``spread`` seconds
    (half a lifetime: a fleet's nodes come up over time, so renewals spread as in a
    fleet that has been up a while), ``at_once`` attestations at a time, retried as the
    agent would; then it runs its loops."""
    limiter = trio.CapacityLimiter(at_once)
    spread_rng = random.Random(seed)

    async def join(agent: SimAgent, token: str) -> None:
        await trio.sleep(spread_rng.uniform(0, spread))
        async with limiter:
            for attempt in range(1, 30):
                try:
                    await agent.attest(token)
                    break
                except CAError as exc:
                    stats.failed(exc)
                    await agent._retry_pause(exc, attempt)
        await agent.run()

    return join


# -- a shard: one simulator process ---------------------------------------------------


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    """JSON objects, one a line, from a pipe."""
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


class Shard:
    """Simulated agents in this process, driven by the bench's commands on stdin.

    Agents are sharded over processes so that each stays under the descriptor limit
    (an agent holds one connection at rest, two while it renews) and the simulators
    use both cores; each shard reports its own CPU, apart from the CA's.
    """

    def __init__(self, cfg: dict[str, Any], out: int) -> None:
        self.cfg = cfg
        self.out = out
        self.stats = Stats()
        ca = Address.parse(cfg["ca"])
        roots = pem.chain_from_pem(str(cfg["roots"]).encode())
        csr = make_csr(x509profile.generate_key())
        self.agents = [SimAgent(n, ca, roots, csr, self.stats) for n, _ in cfg["agents"]]
        for agent in self.agents:
            agent.mid_life = bool(cfg["steady_start"])
        self.tokens = [str(token) for _, token in cfg["agents"]]

    def say(self, obj: object) -> None:
        os.write(self.out, json.dumps(obj).encode() + b"\n")

    async def _fresh_times(self, seconds: float) -> list[float]:
        """Seconds from now until each agent was fresh, for those fresh within ``seconds``."""
        t0, times = trio.current_time(), []

        async def one(agent: SimAgent) -> None:
            await agent.fresh.wait()
            times.append(trio.current_time() - t0)

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for agent in self.agents:
                    nursery.start_soon(one, agent)
        return times

    async def main(self) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        commands = _lines(stdin)
        join = joiner(
            float(self.cfg["spread"]),
            self.stats,
            at_once=int(self.cfg["at_once"]),
            seed=int(self.cfg["seed"]),
        )
        async with trio.open_nursery() as top:
            herd_done, stopped = trio.Event(), trio.Event()

            async def fleet() -> None:
                async with trio.open_nursery() as nursery:
                    for agent, token in zip(self.agents, self.tokens, strict=True):
                        nursery.start_soon(join, agent, token)
                    await herd_done.wait()
                    nursery.cancel_scope.cancel()
                stopped.set()

            top.start_soon(fleet)
            self.say({"ready": len(await self._fresh_times(3600)) == len(self.agents)})
            mark: dict[str, Any] = {}
            async for cmd in commands:
                what = cmd["cmd"]
                if what == "mark":
                    st = self.stats
                    mark = {
                        "cpu": own_cpu(),
                        "renew": len(st.renew_ms),
                        "sign": len(st.sign_ms),
                        "renewals": st.renewals,
                        "batches": st.batches,
                        "polls": st.polls,
                        "overloaded": st.overloaded,
                        "errors": Counter(st.errors),
                        "why": Counter(st.why),
                    }
                    self.say({"ok": True})
                elif what == "window":
                    st = self.stats
                    self.say(
                        {
                            "sim_cpu_s": own_cpu() - mark["cpu"],
                            "renew_ms": st.renew_ms[mark["renew"] :],
                            "sign_ms": st.sign_ms[mark["sign"] :],
                            "renewals": st.renewals - mark["renewals"],
                            "batches": st.batches - mark["batches"],
                            "polls": st.polls - mark["polls"],
                            "overloaded": st.overloaded - mark["overloaded"],
                            "errors": dict(st.errors - mark["errors"]),
                            "why": dict((st.why - mark["why"]).most_common(5)),
                        }
                    )
                elif what == "parked":
                    kib = await parked_connection_kib(
                        self.agents[0], int(cmd["pid"]), int(cmd["count"])
                    )
                    self.say({"kib": kib})
                elif what == "herd":
                    # Everyone drops its connections at once and comes back (as after a
                    # restart of every agent, or of the CA): timed by the bench.
                    herd_done.set()
                    await stopped.wait()
                    for agent in self.agents:
                        await agent.reconnect()
                    for agent in self.agents:  # they run on, for the CA's restart
                        top.start_soon(agent.run)
                    self.say({"fresh_s": await self._fresh_times(float(cmd["seconds"]))})
                elif what == "quit":
                    break
            herd_done.set()
            top.cancel_scope.cancel()
        for agent in self.agents:
            await agent.client.aclose()


def run_shard() -> None:
    """``python -m bench.fleet --shard``: the config is the first line on stdin."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = os.dup(1)
    os.dup2(2, 1)  # nothing but the protocol on the bench's pipe
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            return
        line += chunk
    shard = Shard(json.loads(line), out)
    # As the CA does (`tally.ops.collector`): thousands of long-lived agents made full
    # collector passes a large share of a shard's CPU, which a real agent never pays.
    collector.freeze_loaded()
    collector.rare_full_passes()
    trio.run(shard.main)


class ShardProcess:
    """The bench's end of one shard: commands down its stdin, answers up its stdout."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.answers = _lines(proc.stdout)

    @classmethod
    async def start(cls, cfg: dict[str, Any]) -> ShardProcess:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.fleet", "--shard"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        shard = cls(proc)
        await shard.stdin.send_all(json.dumps(cfg).encode() + b"\n")
        return shard

    async def ask(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        if cmd is not None:
            await self.stdin.send_all(json.dumps(cmd).encode() + b"\n")
        async for answer in self.answers:
            return answer
        raise RuntimeError(f"shard {self.proc.pid} ended (exit {self.proc.returncode})")

    async def close(self) -> None:
        with trio.move_on_after(30):
            await self.stdin.send_all(b'{"cmd": "quit"}\n')
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def ask_all(shards: list[ShardProcess], cmd: dict[str, Any] | None) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = [{} for _ in shards]

    async def one(i: int) -> None:
        answers[i] = await shards[i].ask(cmd)

    async with trio.open_nursery() as nursery:
        for i in range(len(shards)):
            nursery.start_soon(one, i)
    return answers


# -- the bench: the CA, the shards, the phases ------------------------------------------


def ca_daemon(args: argparse.Namespace, work: Path, listen: str = "127.0.0.1:0") -> Daemon:
    ttl = str(args.ttl)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Daemon(
        "ca",
        [
            "ca", "run", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(work / "ca"),
            "--listen", listen, "--admin-socket", str(work / "admin.sock"),
            "--metrics", "127.0.0.1:0", "--agent-svid-ttl", ttl, "--default-svid-ttl", ttl,
            # Below the descriptors the CA may open: past it, a connection is closed at
            # once (the agent retries) rather than failing in accept.
            "--max-connections", str(min(32768, hard - 1024)),
            "--log-level", "info",
        ],
    )  # fmt: skip


async def fleet(args: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    ca = [ca_daemon(args, work)]
    started = ca[0].start("ca.started")

    def restart() -> tuple[Daemon, dict[str, Any]]:
        """The CA again, on the same port and data: what its agents reconnect to."""
        ca[0] = ca_daemon(args, work, started["listen"])
        return ca[0], ca[0].start("ca.started")

    try:
        return await _run(args, n, ca[0], started, str(work / "admin.sock"), restart)
    finally:
        ca[0].stop()


async def _run(
    args: argparse.Namespace,
    n: int,
    daemon: Daemon,
    started: dict[str, Any],
    admin_path: str,
    restart: Callable[[], tuple[Daemon, dict[str, Any]]],
) -> dict[str, Any]:
    admin = Admin(admin_path)
    roots = str((await admin.call("GET", "/v1/bundle"))["bundle"])
    _, rss0 = ca_pid_stats(daemon.pid)
    fds0 = open_fds(daemon.pid)
    spread = args.ttl / 2 if args.spread is None else args.spread
    tokens, ids = await register_fleet(admin, n, args.workloads, int(spread) + 3600)

    # Shards: agent i goes to shard i % k, so every shard joins over the whole spread.
    k = max(1, math.ceil(n / args.per_shard))
    attest_t0 = time.perf_counter()
    shards = [
        await ShardProcess.start(
            {
                "ca": started["listen"],
                "roots": roots,
                "spread": spread,
                "seed": s,
                "at_once": max(8, 64 // k),  # 64 attestations at once over all shards
                "steady_start": args.steady_start,
                "agents": [[i, tokens[i]] for i in range(s, n, k)],
            }
        )
        for s in range(k)
    ]
    try:
        ready = await ask_all(shards, None)  # every agent synced, holding its SVIDs
        if not all(r["ready"] for r in ready):
            raise RuntimeError("some agents never held their SVIDs")
        attest_s = time.perf_counter() - attest_t0
        _, rss_parked = ca_pid_stats(daemon.pid)
        connections = open_fds(daemon.pid) - fds0

        # Steady state.
        await ask_all(shards, {"cmd": "mark"})
        m0 = await admin.metrics(started["metrics"])
        cpu_a, tree_a = ca_pid_stats(daemon.pid)[0], tree_cpu(daemon.pid)
        t0 = time.perf_counter()
        await trio.sleep(args.seconds)
        cpu_b, rss = ca_pid_stats(daemon.pid)
        tree_b = tree_cpu(daemon.pid)
        window = await ask_all(shards, {"cmd": "window"})
        elapsed = time.perf_counter() - t0
        m1 = await admin.metrics(started["metrics"])
        renewals = sum(w["renewals"] for w in window)
        steady_renew = [x for w in window for x in w["renew_ms"]]
        steady_sign = [x for w in window for x in w["sign_ms"]]
        steady_errors: Counter[str] = Counter()
        for w in window:
            steady_errors.update(w["errors"])

        def delta(name: str, a: dict[str, float], b: dict[str, float]) -> float:
            return b.get(name, 0.0) - a.get(name, 0.0)

        # One entry change: what it wakes.
        m2 = await admin.metrics(started["metrics"])
        await admin.call(
            "POST",
            "/v1/entries",
            {
                "spiffe_id": f"spiffe://{TRUST_DOMAIN}/extra",
                "parent_id": ids[0],
                "selectors": ["unix:uid:1"],
            },
        )
        await trio.sleep(0.5)
        m3 = await admin.metrics(started["metrics"])

        # Memory per parked connection, alone: 500 more connections (agent 0's identity,
        # in shard 0), each with a poll parked on it.
        extra = (await shards[0].ask({"cmd": "parked", "pid": daemon.pid, "count": 500}))["kib"]

        # The herd: everyone drops its connections and comes back at once.
        await ask_all(shards, {"cmd": "mark"})
        herd_cpu0, herd_main0 = tree_cpu(daemon.pid), ca_pid_stats(daemon.pid)[0]
        h0 = await admin.metrics(started["metrics"])
        fresh = await ask_all(shards, {"cmd": "herd", "seconds": args.herd_seconds})
        herd_cpu1, herd_main1 = tree_cpu(daemon.pid), ca_pid_stats(daemon.pid)[0]
        h1 = await admin.metrics(started["metrics"])
        herd_fresh = sorted(t for f in fresh for t in f["fresh_s"])
        herd = await ask_all(shards, {"cmd": "window"})

        # The CA restarts (SIGTERM, then the same port and data): every agent keeps its
        # SVIDs, and the clock runs from the CA's start until every agent has its poll
        # parked there again (`tally_ca_polls_parked`).
        await ask_all(shards, {"cmd": "mark"})
        daemon.stop()
        daemon, again = restart()
        restart_cpu0, restart_t0 = tree_cpu(daemon.pid), time.perf_counter()
        restart_half = restart_all = math.nan
        parked = 0.0
        while time.perf_counter() - restart_t0 < args.herd_seconds:
            await trio.sleep(0.5)
            parked = (await admin.metrics(again["metrics"])).get("tally_ca_polls_parked", 0)
            if parked * 2 >= n and math.isnan(restart_half):
                restart_half = time.perf_counter() - restart_t0
            if parked >= n:
                restart_all = time.perf_counter() - restart_t0
                break
        restart_cpu1 = tree_cpu(daemon.pid)
        after_restart = await ask_all(shards, {"cmd": "window"})
    finally:
        for shard in shards:
            await shard.close()

    return {
        "agents": n,
        "workloads": args.workloads,
        "shards": k,
        "attest_s": attest_s,
        "steady_s": elapsed,
        "ca_cpu": (tree_b - tree_a) / elapsed,
        "ca_main_cpu": (cpu_b - cpu_a) / elapsed,
        "sim_cpu": sum(w["sim_cpu_s"] for w in window) / elapsed,
        "rss_mib": rss / 1024,
        "kib_per_agent": (rss_parked - rss0) / n,
        "connections": connections,
        "kib_per_parked_connection": extra,
        "kib_per_connection": (rss_parked - rss0) / max(1, connections),
        "renew_p50": pct(steady_renew, 0.5),
        "renew_p99": pct(steady_renew, 0.99),
        "sign_p50": pct(steady_sign, 0.5),
        "sign_p99": pct(steady_sign, 0.99),
        "renewals_per_s": renewals / elapsed,
        "batches_per_s": sum(w["batches"] for w in window) / elapsed,
        "polls_per_s": sum(w["polls"] for w in window) / elapsed,
        "connections_per_s": delta("tally_ca_connections_accepted_total", m0, m1) / elapsed,
        "checks_per_s": delta("tally_ca_poll_checks_total", m0, m1) / elapsed,
        "wakeups_per_renewal": delta("tally_ca_poll_wakeups_total", m0, m1) / max(1, renewals),
        "checks_per_renewal": delta("tally_ca_poll_checks_total", m0, m1) / max(1, renewals),
        "entry_change_wakeups": delta(ENTRY_WAKES, m2, m3),
        "wakeups_per_renewal_only": delta(RENEWAL_WAKES, m0, m1) / max(1, renewals),
        "overloaded": sum(w["overloaded"] for w in window),
        "errors": dict(steady_errors),
        "herd_overloaded": sum(h["overloaded"] for h in herd),
        "herd_errors": sum(sum(h["errors"].values()) for h in herd),
        "herd_errors_by": dict(sum((Counter(h["errors"]) for h in herd), Counter[str]())),
        "herd_errors_why": dict(
            sum((Counter(h["why"]) for h in herd), Counter[str]()).most_common(5)
        ),
        "herd_s": herd_fresh[-1] if len(herd_fresh) == n else math.nan,
        "herd_fresh": len(herd_fresh),
        "herd_p50_s": herd_fresh[(n - 1) // 2] if len(herd_fresh) > (n - 1) // 2 else math.nan,
        "herd_ca_cpu_s": herd_cpu1 - herd_cpu0,
        "herd_ca_main_cpu_s": herd_main1 - herd_main0,
        "herd_connections_per_agent": delta("tally_ca_connections_accepted_total", h0, h1) / n,
        "herd_sim_cpu_s": sum(h["sim_cpu_s"] for h in herd),
        "restart_s": restart_all,
        "restart_parked": parked,
        "restart_p50_s": restart_half,
        "restart_ca_cpu_s": restart_cpu1 - restart_cpu0,
        "restart_errors_by": dict(
            sum((Counter(a["errors"]) for a in after_restart), Counter[str]())
        ),
    }


def main() -> None:
    if sys.argv[1:] == ["--shard"]:
        run_shard()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", default="100,1000")
    parser.add_argument("--workloads", type=int, default=10)
    parser.add_argument("--ttl", type=int, default=60, help="agent and workload SVID TTL, s")
    parser.add_argument("--seconds", type=float, default=60, help="steady-state window")
    parser.add_argument(
        "--spread", type=float, default=None, help="agents join over this many s (ttl/2)"
    )
    parser.add_argument(
        "--steady-start",
        action="store_true",
        help="first renewals spread over one mean renewal interval, as in a fleet up for"
        " a while: the true rate at once, so a long TTL (3600) needs no long join",
    )
    parser.add_argument(
        "--per-shard", type=int, default=2500, help="simulated agents per simulator process"
    )
    parser.add_argument(
        "--herd-seconds", type=float, default=600, help="give up on the herd after this"
    )
    parser.add_argument("--json", action="store_true", help="also print each row as JSON")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    for n in (int(x) for x in args.agents.split(",")):
        with tempfile.TemporaryDirectory(prefix="tally-fleet-") as tmp:
            rows.append(trio.run(fleet, args, n, Path(tmp)))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"workloads per agent: {args.workloads}; agent and workload SVID TTL {args.ttl}s "
        f"(time x{3600 / args.ttl:g}: N agents here renew like {3600 / args.ttl:g} x N at 1 h)"
    )
    print(
        "| agents | shards | CA CPU (main) | sim CPU | CA RSS MiB | KiB/agent "
        "| KiB/parked conn | renew p50/p99 ms | sign p50/p99 ms | renewals/s | signs/s | polls/s "
        "| conns/s "
        "| wakes/renewal | wakes/entry change | 429s | errors | herd: fresh | herd p50 / all s "
        "| herd CA CPU s | herd 429s | herd errors | CA restart: parked | half / all s "
        "| CA CPU s |"
    )
    print("|" + "---|" * 25)
    for r in rows:
        print(
            f"| {r['agents']} | {r['shards']} | {r['ca_cpu']:.0%} ({r['ca_main_cpu']:.0%}) "
            f"| {r['sim_cpu']:.0%} "
            f"| {r['rss_mib']:.0f} | {r['kib_per_agent']:.0f} "
            f"| {r['kib_per_parked_connection']:.0f} "
            f"| {r['renew_p50']:.0f} / {r['renew_p99']:.0f} "
            f"| {r['sign_p50']:.0f} / {r['sign_p99']:.0f} "
            f"| {r['renewals_per_s']:.1f} | {r['batches_per_s']:.1f} | {r['polls_per_s']:.0f} "
            f"| {r['connections_per_s']:.1f} "
            f"| {r['wakeups_per_renewal_only']:.2f} | {r['entry_change_wakeups']:.0f} "
            f"| {r['overloaded']} | {sum(r['errors'].values())} "
            f"| {r['herd_fresh']} | {r['herd_p50_s']:.1f} / {r['herd_s']:.1f} "
            f"| {r['herd_ca_cpu_s']:.0f} | {r['herd_overloaded']} "
            f"| {r['herd_errors']} | {r['restart_parked']:.0f} "
            f"| {r['restart_p50_s']:.1f} / {r['restart_s']:.1f} | {r['restart_ca_cpu_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
