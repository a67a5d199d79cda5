"""A slow or stalled sender costs a node's other receives nothing (the receiving thread slot)."""

import torch
import trio

from gossamer.node import LinkShape

torch.set_num_threads(1)


async def test_a_trickling_sender_does_not_hold_up_a_fast_one(node_config):
    """A peer behind a 0.4 Mbit/s uplink sends 256 KB (~5 s of trickle); a fast peer's 32 MB
    must not wait for it: the receiver's one threaded receive slot is shared, not held (it was
    held: the fast message arrived only after the slow one)."""
    from conftest import running_nodes

    configs = [node_config(shape=LinkShape(up_mbit=0.4)), node_config(), node_config()]
    async with running_nodes(configs) as (slow, fast, receiver):
        for peer in (slow, fast):
            await peer.connect(receiver.addrs()[0])
        slow_in = receiver.dataplane.post_recv(slow.peer_id, "slow")
        fast_in = receiver.dataplane.post_recv(fast.peer_id, "fast")
        big = {"x": torch.ones(8 << 20)}  # 32 MB: more than loopback's socket buffers

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: slow.dataplane.send(
                    receiver.peer_id, "slow", {"x": torch.ones(64_000)}, timeout=120
                )
            )
            # the slow message has started arriving (the receiver is in it) before the fast one
            await trio.sleep(0.5)
            assert not slow_in.done
            await fast.dataplane.send(receiver.peer_id, "fast", big, timeout=120)
            got = await fast_in.wait(60)
            assert torch.equal(got["x"], big["x"])
            assert not slow_in.done  # the fast one finished while the slow one still trickles
            nursery.cancel_scope.cancel()
