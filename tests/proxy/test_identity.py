"""proxy.identity without a daemon: the checks before publishing, and the file source's reloads."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import trio

from proxy.identity import FileSource, Identity, IdentityError, make_identity
from tally.spiffe.bundle import Bundle
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tests.pki import Authority, Svid, now
from tests.proxy.inprocess import identity_of


@pytest.fixture
def ex() -> Authority:
    return Authority.create("example.org")


def reason_of(
    ex: Authority,
    svid: Svid,
    *,
    key: object = None,
    bundles: dict[TrustDomain, Bundle] | None = None,
    want: SpiffeId | None = None,
    at: datetime | None = None,
) -> str:
    with pytest.raises(IdentityError) as info:
        make_identity(
            svid.chain,
            svid.key if key is None else key,
            {ex.td: ex.bundle} if bundles is None else bundles,
            want=want,
            now=at or now(),
        )
    return info.value.reason


def test_a_good_svid_becomes_an_identity(ex):
    svid = ex.svid("spiffe://example.org/api")
    identity = identity_of(ex, svid)
    assert identity.spiffe_id == SpiffeId.parse("spiffe://example.org/api")
    assert identity.leaf == svid.leaf
    assert identity.serial == format(svid.leaf.serial_number, "x")
    assert identity.roots() == [ex.root]
    assert identity.trusted() == {ex.td: ex.bundle.fingerprints()}


def test_each_check_before_publishing_has_its_reason(ex):
    svid = ex.svid("spiffe://example.org/api")
    assert reason_of(ex, Svid([], svid.key)) == "empty_chain"
    assert reason_of(ex, svid, want=SpiffeId.parse("spiffe://example.org/web")) == "wrong_spiffe_id"
    assert reason_of(ex, svid, key=ex.svid("spiffe://example.org/api").key) == "key_mismatch"
    assert reason_of(ex, svid, key="not a key") == "bad_key"
    assert reason_of(ex, svid, bundles={}) == "no_bundle"
    stranger = Authority.create("example.org")  # same name, other keys
    assert reason_of(ex, svid, bundles={ex.td: stranger.bundle}) == "untrusted"
    assert reason_of(ex, svid, at=now() + timedelta(hours=2)) == "expired"


def test_same_as_sees_a_new_chain_and_a_new_bundle_but_not_a_reread(ex):
    svid = ex.svid("spiffe://example.org/api")
    first = identity_of(ex, svid)
    assert identity_of(ex, svid).same_as(first)
    assert not first.same_as(None)
    assert not identity_of(ex, ex.svid("spiffe://example.org/api")).same_as(first)
    assert not identity_of(ex, svid, Authority.create("other.org")).same_as(first)


def last_error(source: FileSource) -> str | None:
    """Read afresh: mypy would keep what an earlier assert narrowed it to."""
    return source.last_error


def file_source(ex: Authority, tmp_path, svid: Svid) -> FileSource:
    svid.write(tmp_path, ex.bundle)
    return FileSource(
        tmp_path / "svid.pem",
        tmp_path / "key.pem",
        tmp_path / "bundle.pem",
        {},
        want=None,
        clock=now,
    )


def test_file_source_loads_and_its_signature_follows_the_files(ex, tmp_path):
    svid = ex.svid("spiffe://example.org/api")
    source = file_source(ex, tmp_path, svid)
    assert source.load().serial == format(svid.leaf.serial_number, "x")
    seen = source.signature()
    ex.svid("spiffe://example.org/api").write(tmp_path, ex.bundle)
    assert source.signature() != seen
    (tmp_path / "key.pem").unlink()
    with pytest.raises(IdentityError) as info:
        source.load()
    assert info.value.reason == "unreadable" and "--key" in str(info.value)
    assert (-1, -1, -1) in source.signature()


async def test_file_source_publishes_only_whole_replacements(ex, tmp_path):
    first = ex.svid("spiffe://example.org/api")
    source = file_source(ex, tmp_path, first)
    published: list[Identity] = []
    got = trio.Event()

    def publish(identity: Identity) -> None:
        published.append(identity)
        got.set()

    second = ex.svid("spiffe://example.org/api")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run, publish, source.signature())
        # Half a replacement: the new certificate beside the old key fails rule 1 ...
        second.write(tmp_path / "next", ex.bundle)
        (tmp_path / "svid.pem").write_bytes((tmp_path / "next" / "svid.pem").read_bytes())
        with trio.fail_after(10):
            while last_error(source) is None:
                source.reload_now()
                await trio.sleep(0.05)
        assert "does not belong" in str(source.last_error)
        assert published == []
        # ... and the key arriving completes it.
        (tmp_path / "key.pem").write_bytes((tmp_path / "next" / "key.pem").read_bytes())
        source.reload_now()
        with trio.fail_after(10):
            await got.wait()
        assert [i.serial for i in published] == [format(second.leaf.serial_number, "x")]
        assert last_error(source) is None
        nursery.cancel_scope.cancel()
