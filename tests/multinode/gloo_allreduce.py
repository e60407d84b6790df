"""One rank of a gloo all_reduce, run on a virtual host by the harness tests: proves that torch.distributed between
the nodes works the way the launcher will use it (tcp:// rendezvous at rank 0's address, gloo over the nodes' eth0).

Usage: python gloo_allreduce.py RANK WORLD_SIZE MASTER_ADDR MASTER_PORT
Prints one line: "rank R host H sum S" where S must be 1 + 2 + ... + WORLD_SIZE.
"""

from __future__ import annotations

import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> None:
    rank, world_size, master_addr, master_port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # A short timeout: a wrong interface shows up as a hang in connectFullMesh, and the test must fail, not wait 300 s.
    dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=20))
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor)
    print(f"rank {rank} host {socket.gethostname()} sum {tensor.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
