"""The controller's side of the worker sockets: nothing waits forever.

Real ZMQ sockets on loopback. The test plays the trainer ranks (a DEALER per rank, as
test_trainer_worker plays the controller): that is what lets it send frames no real rank
would send, and stay silent where a real rank would be stuck in a collective.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import zmq
import zmq.asyncio

from actors.controller.workers import WorkerFailure, WorkerPool
from cluster.codec import decode, encode
from cluster.messages import (
    DatumBatch, ErrorResp, RankCoords, TrainerDropAdapterReq, TrainerDropAdapterResp, TrainerForwardBackwardReq,
    TrainerForwardBackwardResp, ForwardBackwardResult, PassEntry, PassOutcome, WorkerReadyEvent,
)
from cluster.parallel import ParallelDims
from cluster.transport import AsyncPeer, BlockingPeer, RemoteError
from launch.cluster import free_port


def _address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def _request_with_arrays() -> TrainerForwardBackwardReq:
    batch = DatumBatch(tokens=np.arange(4), lengths=np.array([4]), loss_inputs={"target_tokens": np.arange(4)})
    return TrainerForwardBackwardReq(entries=[PassEntry(slot=1, loss_fn="cross_entropy", batch=batch)])


def _without_its_arrays(msg) -> list:
    """A message whose array frames got lost: its header still decodes, the message does not."""
    return encode(msg)[:1]


def test_undecodable_requests_and_replies_fail_their_calls():
    address = _address()

    def worker(ctx: zmq.Context):
        peer = BlockingPeer(ctx, zmq.DEALER, address, bind=False, identity=b"w")
        peer.send(WorkerReadyEvent(role="trainer", rank=0, world_size=1))
        got = peer.recv(timeout_ms=10_000)  # the broken request is answered inside recv; this is the next one
        _, req = got
        reply = TrainerForwardBackwardResp(outcomes=[PassOutcome(result=ForwardBackwardResult(
            lengths=np.array([1]), logprobs=np.zeros(1, np.float32), elementwise_loss=np.zeros(1, np.float32)))])
        reply.call_id = req.call_id
        peer.sock.send_multipart(_without_its_arrays(reply))
        peer.recv(timeout_ms=200)  # let the last frames leave before closing
        peer.close()

    async def scenario():
        ctx = zmq.asyncio.Context()
        unsolicited: asyncio.Queue = asyncio.Queue()  # what arrives without a call waiting for it
        router = AsyncPeer(ctx, zmq.ROUTER, address, bind=True)
        router.start(lambda peer, msg: unsolicited.put_nowait((peer, msg)))
        thread = threading.Thread(target=worker, args=(zmq.Context.instance(),))
        thread.start()
        identity, hello = await asyncio.wait_for(unsolicited.get(), 10)
        assert isinstance(hello, WorkerReadyEvent)

        broken = _request_with_arrays()
        broken.call_id = 777
        router.sock.send_multipart([identity, *_without_its_arrays(broken)])
        _, answer = await asyncio.wait_for(unsolicited.get(), 10)
        assert isinstance(answer, ErrorResp) and answer.call_id == 777 and answer.status == 400
        assert "undecodable TrainerForwardBackwardReq" in answer.detail

        with pytest.raises(RemoteError) as caught:
            await router.call(identity, TrainerDropAdapterReq(slot=1), timeout=10)
        assert caught.value.status == 502 and "undecodable TrainerForwardBackwardResp reply" in caught.value.detail
        await asyncio.to_thread(thread.join, 10)
        router.close()
        ctx.term()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _pool_with_ranks(dims: ParallelDims, answering: set[int], timeout_s: float | None = None, coords_of=None):
    """A WorkerPool and, in threads, its trainer ranks: they say hello (with `coords_of(rank)`,
    by default the layout's), then the ones in `answering` answer every request and the rest
    never answer anything."""
    address, stop = _address(), threading.Event()

    def rank(r: int):
        peer = BlockingPeer(zmq.Context.instance(), zmq.DEALER, address, bind=False, identity=f"trainer-{r}".encode())
        coords = coords_of(r) if coords_of else dims.coords(r)
        peer.send(WorkerReadyEvent(role="trainer", rank=r, world_size=dims.world_size, coords=coords))
        while not stop.is_set():
            got = peer.recv(timeout_ms=50)
            if got is not None and r in answering:
                peer.reply(got[1], TrainerDropAdapterResp())
        peer.close()

    ctx = zmq.asyncio.Context()
    pool = WorkerPool(ctx, address, dims, engines=0, trainer_timeout_s=timeout_s)
    pool.start()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(dims.world_size)]
    for t in threads:
        t.start()
    try:
        yield pool
    finally:
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join, 10)
        pool.peer.close()
        ctx.term()


def test_a_rank_that_never_answers_fails_the_step_and_poisons_the_pool():
    async def scenario():
        async with _pool_with_ranks(ParallelDims(dp=1, tp=2, pp=1), answering={0}, timeout_s=0.5) as pool:
            await asyncio.wait_for(pool.ready.wait(), 10)
            with pytest.raises(WorkerFailure, match=r"trainer rank\(s\) \[1\] did not answer TrainerDropAdapterReq "
                                                   r"within 0.5 s"):
                await pool.trainer_broadcast(lambda: TrainerDropAdapterReq(slot=1))
            with pytest.raises(WorkerFailure, match="did not answer"):  # fails fast from now on
                await asyncio.wait_for(pool.trainer_broadcast(lambda: TrainerDropAdapterReq(slot=1)), 0.2)

    asyncio.run(scenario())


def test_a_rank_whose_coordinates_disagree_with_the_layout_is_refused():
    async def scenario():
        async with _pool_with_ranks(ParallelDims(dp=2, tp=1, pp=1), answering={0, 1},
                                    coords_of=lambda r: RankCoords(dp=0, tp=r)) as pool:
            for _ in range(100):
                if pool.failure:
                    break
                await asyncio.sleep(0.05)
            assert "trainer 1 reports coordinates" in pool.failure and "dp=2 tp=1 pp=1" in pool.failure
            assert not pool.ready.is_set()

    asyncio.run(scenario())


def test_messages_past_the_high_water_mark_wait_and_leave_in_order():
    """A peer that does not read for a while: what does not fit its queue waits in the AsyncPeer (the loop
    never blocks) and leaves, in order, once the peer reads. inproc: no kernel buffers to absorb the queue, and
    past ZMQ's default high-water mark of 1000 (the bound side's options are those it had when it bound)."""
    address, count = "inproc://past-the-high-water-mark", 1500
    got: list[int] = []
    reading = threading.Event()

    def slow_reader(ctx: zmq.Context):
        sock = zmq.Socket(ctx, zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"slow")
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.connect(address)
        sock.send_multipart(encode(WorkerReadyEvent(role="engine", rank=0, world_size=1)))
        reading.wait(10)
        while len(got) < count and sock.poll(10_000):
            got.append(decode(sock.recv_multipart()).call_id)
        sock.close(0)

    async def scenario():
        ctx = zmq.asyncio.Context()
        hello: asyncio.Queue = asyncio.Queue()
        router = AsyncPeer(ctx, zmq.ROUTER, address, bind=True)
        router.start(lambda peer, msg: hello.put_nowait(peer))
        thread = threading.Thread(target=slow_reader, args=(ctx,))
        thread.start()
        identity = await asyncio.wait_for(hello.get(), 10)
        for i in range(count):
            router.send(identity, TrainerDropAdapterResp(call_id=i))
        assert router._backlog, "nothing waited: the test never reached the high-water mark"
        reading.set()
        await asyncio.to_thread(thread.join, 20)
        assert got == list(range(count)) and not router._backlog
        with pytest.raises(zmq.ZMQError):  # nothing waits now: sent at once to a peer that is gone, it raises
            router.send(b"gone", TrainerDropAdapterResp())
        router.close()
        ctx.term()

    asyncio.run(scenario())


def test_a_reply_to_a_peer_that_is_gone_is_dropped_and_the_peer_keeps_serving():
    address = _address()

    def client(ctx: zmq.Context, identity: bytes, out: list):
        peer = BlockingPeer(ctx, zmq.DEALER, address, bind=False, identity=identity)
        out.append(peer.call(TrainerDropAdapterReq(slot=1), timeout_ms=10_000))
        peer.close()

    async def scenario():
        ctx = zmq.asyncio.Context()
        router = AsyncPeer(ctx, zmq.ROUTER, address, bind=True)

        def answer(peer, req):
            router.reply(b"nobody", req, TrainerDropAdapterResp())  # logged and dropped, not raised
            router.reply(peer, req, TrainerDropAdapterResp())

        router.start(answer)
        replies: list = []
        thread = threading.Thread(target=client, args=(zmq.Context.instance(), b"c", replies))
        thread.start()
        await asyncio.to_thread(thread.join, 20)
        assert [type(r) for r in replies] == [TrainerDropAdapterResp]
        router.close()
        ctx.term()

    asyncio.run(scenario())
