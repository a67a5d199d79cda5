"""Admission to restricted runs through real nodes: invites, admit and revoke."""

from __future__ import annotations

import pytest
from conftest import wait_until
from crdt_helpers import crdt_nodes

from gossamer.crdt import Charter, CharterError, Invite, InviteError, RunAccessError
from gossamer.crdt.invite import InviteLedger
from gossamer.node import Identity


def addr(service) -> str:
    return service.node.addrs()[0]


async def test_invite_admits_once_and_only_once(node_config):
    async with crdt_nodes([node_config() for _ in range(3)]) as (host_s, guest_s, second_s):
        host = await host_s.host_run("club", access="restricted", config={"model": "m"})
        token = host_s.make_invite(host.run_id, ttl=60, uses=1).text()
        guest = await guest_s.join_run(host.run_id, bootstrap=[addr(host_s)], invite=token)
        await guest.wait_for(lambda doc: doc.config().model == "m", timeout=5)
        assert guest_s.node.peer_id in host.charter.allow
        await wait_until(lambda: guest_s.node.peer_id in host.doc.members(), 5, what="joined")
        # the same single-use token, presented by someone else: refused
        with pytest.raises(RunAccessError, match="used 1 time"):
            await second_s.join_run(host.run_id, bootstrap=[addr(host_s)], invite=token, timeout=5)
        assert second_s.node.peer_id not in host.charter.allow
        # the ledger is on disk: a restarted host would not refill the token
        ledger = InviteLedger(host_s.root / host.run_id / "invites.json")
        assert ledger.used(Invite.parse(token)) == 1


async def test_expired_forged_and_foreign_invites_are_refused(node_config):
    now = [1_000.0]
    async with crdt_nodes([node_config() for _ in range(2)]) as (host_s, guest_s):
        host_s.clock = lambda: now[0]
        host = await host_s.host_run("club", access="restricted")
        expired = host_s.make_invite(host.run_id, ttl=10, uses=0)
        now[0] += 11
        with pytest.raises(RunAccessError, match="expired"):
            await guest_s.join_run(
                host.run_id, bootstrap=[addr(host_s)], invite=expired.text(), timeout=5
            )
        # a token signed by another key for this run id, and one altered after signing
        mallory = Identity.generate()
        forged = Invite(host.run_id, b"\x01" * 16, now[0] + 100, 0)._signed(mallory)
        with pytest.raises(RunAccessError, match="signature"):
            await guest_s.join_run(
                host.run_id, bootstrap=[addr(host_s)], invite=forged.text(), timeout=5
            )
        good = host_s.make_invite(host.run_id, ttl=100, uses=1)
        altered = Invite(good.run_id, good.token_id, good.expires, 0, good.signature)
        with pytest.raises(RunAccessError, match="signature"):
            await guest_s.join_run(
                host.run_id, bootstrap=[addr(host_s)], invite=altered.text(), timeout=5
            )
        with pytest.raises(InviteError):
            Invite.create(mallory, host.run_id)  # only the creator can make one
        with pytest.raises(InviteError):
            Invite.parse("gsi1.not-base64!!")
        assert guest_s.node.peer_id not in host.charter.allow
        assert guest_s.node.peer_id not in host.doc.members()


async def test_revoked_member_is_refused_mid_run_and_admit_lets_it_back(node_config):
    async with crdt_nodes([node_config() for _ in range(2)]) as (host_s, member_s):
        member_id = member_s.node.peer_id
        host = await host_s.host_run("open_one")  # open runs can revoke too (charter deny)
        member = await member_s.join_run(host.run_id, bootstrap=[addr(host_s)])
        await wait_until(lambda: member_id in host.doc.members(), 5, what="joined")
        host_s.revoke(host.run_id, member_id)
        assert not host.charter.may_join(member_id)
        await wait_until(lambda: not host.linked_peers(), 5, what="revoked member unlinked")
        await member.wait_for(lambda doc: not doc.charter.may_join(member_id), timeout=5)
        await wait_until(lambda: not member.linked_peers(), 5, what="the member's end closed")
        with pytest.raises(RunAccessError, match="not admitted"):
            await member_s.join_run(host.run_id, bootstrap=[addr(host_s)], timeout=5)
        with pytest.raises(CharterError, match="only the creator"):
            member_s.admit(host.run_id, member_id)
        token = host_s.make_invite(host.run_id, ttl=60, uses=0).text()
        with pytest.raises(RunAccessError, match="revoked"):  # an invite does not undo it
            await member_s.join_run(host.run_id, bootstrap=[addr(host_s)], invite=token, timeout=5)
        host_s.admit(host.run_id, member_id)
        await member_s.join_run(host.run_id, bootstrap=[addr(host_s)], timeout=5)
        await wait_until(lambda: member_id in host.linked_peers(), 5, what="linked again")


def test_charter_deny_round_trips_and_old_charters_keep_their_bytes():
    me, other = Identity.generate(), Identity.generate()
    charter = Charter.create(me, "runs", created=5.0)
    blob = charter.encode()
    assert b"deny" not in blob
    revoked = charter.revoke(me, other.peer_id)
    again = Charter.decode(revoked.encode(), charter.run_id)
    assert again.deny == {other.peer_id} and not again.may_join(other.peer_id)
    assert again.admit(me, other.peer_id).may_join(other.peer_id)
    with pytest.raises(CharterError, match="host"):
        charter.revoke(me, me.peer_id)
