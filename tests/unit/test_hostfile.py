"""Hostfiles (launch/hostfile.py) and what the launcher makes of them: formats, errors by line, placement,
the flags that must agree with it, and the commands that start each host's share."""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from launch.hostfile import HostEntry, HostfileError, Placement, parse_hostfile
from launch.remote import SshSpawner, SrunSpawner, RemoteSettings, is_local_host, remote_env

HOSTFILE = """\
# the usual format, a colon, comments and blank lines
node1 slots=2 engines=1

node2:1            # engines from --engines-per-host
node3 slots=0 engines=2 addr=10.0.0.13
"""


def test_every_format_is_read_in_file_order():
    hosts = parse_hostfile(HOSTFILE)
    assert hosts == [HostEntry("node1", 2, 1, None, 2), HostEntry("node2", 1, None, None, 4),
                     HostEntry("node3", 0, 2, "10.0.0.13", 5)]


@pytest.mark.parametrize("text, message", [
    ("node1 slots=2\nnode2 slots=two\n", "line 2: slots must be a whole number"),
    ("node1 slots=1\n\n# x\nnode1:1\n", "line 4: host 'node1' is already on line 1"),
    ("node1\n", "line 1: no slots"),
    ("node1 gpus=2\n", "line 1: unknown key 'gpus'"),
    ("node1 slots=1 slots=2\n", "line 1: slots given twice"),
    ("node1:x\n", "line 1: expected `host slots=N` or `host:N`"),
    ("node1 slots\n", "line 1: expected key=value"),
    ("# nothing\n\n", "names no host"),
])
def test_a_bad_hostfile_is_refused_with_its_line(text, message):
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(text, "hosts.txt")


def test_placement_numbers_ranks_and_engines_host_by_host():
    placement = Placement.from_hosts(parse_hostfile(HOSTFILE), engines_per_host=3)
    assert [(n.host, n.node_rank, list(n.ranks)) for n in placement.trainer_nodes] == [
        ("node1", 0, [0, 1]), ("node2", 1, [2])]  # node3 has no slot: no torchrun there
    assert placement.engine_hosts == ("node1", "node2", "node2", "node2", "node3", "node3")
    assert placement.trainer_ranks == 3
    assert placement.describe()[2] == "node3: no trainer ranks, engines [4, 5]"


def test_placement_refuses_totals_that_disagree_with_the_flags():
    hosts = parse_hostfile(HOSTFILE)
    with pytest.raises(HostfileError, match="slots add up to 3 trainer ranks, but --trainer-ranks is 4"):
        Placement.from_hosts(hosts, trainer_ranks=4)
    with pytest.raises(HostfileError, match="places 3 engine\\(s\\), but --engines is 2"):
        Placement.from_hosts(hosts, engines=2)
    with pytest.raises(HostfileError, match="no host runs an engine"):
        Placement.from_hosts(parse_hostfile("a:1\nb:1\n"))
    with pytest.raises(HostfileError, match="gives no host a slot"):
        Placement.from_hosts(parse_hostfile("a slots=0 engines=1\n"))


def _parse(tmp_path, text, *flags):
    from launch.cluster import parse_args

    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    return parse_args(["--hostfile", str(hostfile), *flags])


def test_the_launcher_takes_ranks_and_engines_from_the_hostfile(tmp_path):
    args = _parse(tmp_path, "localhost slots=2 engines=1\n")
    assert (args.trainer_ranks, args.engines, args.advertise_addr) == (2, 1, "127.0.0.1")  # all local
    args = _parse(tmp_path, "n1:1\nn2:1\n", "--engines-per-host", "1", "--advertise-addr", "10.1.2.3")
    assert args.placement.engine_hosts == ("n1", "n2") and args.trainer_ranks == 2


@pytest.mark.parametrize("text, flags, message", [
    ("n1:1\n", ["--engines-per-host", "1"], "--advertise-addr is required with remote hosts \\(n1\\)"),
    ("n1:1\n", ["--engines-per-host", "1", "--advertise-addr", "127.0.0.1"], "loopback address"),
    ("n1:1\n", ["--engines-per-host", "1", "--advertise-addr", "node0"], "not an IPv4 address"),
    ("n1:1\n", ["--engines-per-host", "1", "--trainer-ranks", "2"], "--trainer-ranks is 2"),
    ("n1 slots=1 engines=x\n", [], "line 1: engines must be a whole number"),
    ("n1:1\n", ["--advertise-addr", "10.1.2.3", "--srun-het-group", "1"], "--srun-het-group is for --spawner srun"),
    ("n1:1\n", ["--advertise-addr", "10.1.2.3", "--spawner", "srun", "--srun-het-group", "-1"], "must be >= 0"),
])
def test_the_launcher_refuses_a_hostfile_layout_before_starting(tmp_path, capsys, text, flags, message):
    with pytest.raises(SystemExit) as exc:
        _parse(tmp_path, text, *flags)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_multinode_flags_need_a_hostfile(capsys):
    from launch.cluster import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--engines-per-host", "2"])
    assert "--engines-per-host need(s) --hostfile" in capsys.readouterr().err
    assert parse_args([]).placement.engine_hosts == ("localhost",)  # single node: as before


def test_commands_for_a_remote_host_carry_the_environment_and_working_directory():
    env = remote_env({"TINKERD_LOG_LEVEL": "DEBUG", "HOME": "/root", "GLOO_SOCKET_IFNAME": "eth1"}, "/srv/tinkerd",
                     gloo_ifname="eth0")
    assert env == {"PYTHONPATH": "/srv/tinkerd", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "TINKERD_LOG_LEVEL": "DEBUG", "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    settings = RemoteSettings(python="/opt/py/bin/python", workdir="/srv/tinker d", env=env, ssh_config="/c")
    command = SshSpawner(settings).remote_command(["/opt/py/bin/python", "-m", "x", "--config", "/s/a b.json"])
    assert shlex.split(command) == ["cd", "/srv/tinker d", "&&", "exec", "env", "GLOO_SOCKET_IFNAME=eth0",
                                    "HF_HUB_OFFLINE=1", "NCCL_SOCKET_IFNAME=eth0", "PYTHONPATH=/srv/tinkerd",
                                    "TINKERD_LOG_LEVEL=DEBUG", "TOKENIZERS_PARALLELISM=false",
                                    "/opt/py/bin/python", "-m", "x", "--config", "/s/a b.json"]
    assert SrunSpawner(settings).command("node2", ["py"])[:4] == ["srun", "--nodes=1", "--ntasks=1",
                                                                   "--nodelist=node2"]


def test_srun_steps_go_to_the_het_group_only_when_one_is_given(tmp_path):
    settings = RemoteSettings(python="py", workdir="/srv/tinkerd")
    plain = ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu2", "--overlap", "--export=ALL",
             "--kill-on-bad-exit=1", "--chdir=/srv/tinkerd", "py", "-m", "x"]
    assert SrunSpawner(settings).command("gpu2", ["py", "-m", "x"]) == plain  # a plain allocation
    het = RemoteSettings(python="py", workdir="/srv/tinkerd", srun_het_group=1)
    assert SrunSpawner(het).command("gpu2", ["py", "-m", "x"]) == ["srun", "--het-group=1", *plain[1:]]

    from launch.multinode import multinode_layout

    for flags, group in (([], None), (["--srun-het-group", "1"], 1), (["--srun-het-group", "0"], 0)):
        args = _parse(tmp_path, "gpu2:1\n", "--engines-per-host", "1", "--advertise-addr", "10.1.2.3",
                      "--spawner", "srun", *flags)
        layout = multinode_layout(args, args.placement, {})
        assert layout.spawners.for_host("gpu2").settings.srun_het_group == group


def test_local_hosts_need_no_ssh():
    import socket

    assert is_local_host("localhost") and is_local_host(socket.gethostname())
    assert not is_local_host("node-that-is-not-here")


def test_each_trainer_host_gets_its_own_torchrun_with_its_node_rank(tmp_path):
    from cluster.config import ClusterConfig
    from launch.cluster import Cluster
    from launch.multinode import HostLayout

    placement = Placement.from_hosts(parse_hostfile("a slots=2 engines=1\nb slots=1\n"))
    layout = HostLayout.single_node(placement, {})
    layout.master_addr, layout.master_port = "10.0.0.1", 29400
    cluster = Cluster(ClusterConfig(state_dir=str(tmp_path)), tmp_path / "c.json", layout)
    started = []
    cluster.spawn = lambda name, cmd, host="localhost": started.append((name, host, cmd))
    cluster.start_trainers()
    assert cluster.trainer_names == ["trainer@a", "trainer@b"]
    (_, host_a, cmd_a), (_, host_b, cmd_b) = started
    assert (host_a, host_b) == ("a", "b") and cmd_a[0] == sys.executable
    tail = ["--master-addr", "10.0.0.1", "--master-port", "29400", "-m", "actors.trainer.main"]
    assert " ".join(["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", *tail]) in " ".join(cmd_b)
    assert " ".join(["--node-rank", "0", "--nproc-per-node", "2"]) in " ".join(cmd_a)


@pytest.mark.parametrize("hostfile, torchrun", [("localhost slots=1 engines=1\n", False),
                                                 ("localhost slots=2 engines=1\n", True),
                                                 ("a slots=1 engines=1\nb slots=1\n", True)])
def test_a_lone_rank_starts_without_torchrun(tmp_path, hostfile, torchrun):
    """World size 1 needs no rendezvous: the launcher starts the rank itself (and so watches and kills the rank,
    not a torchrun above it); several ranks, on one host or more, start under torchrun."""
    from cluster.config import ClusterConfig
    from launch.cluster import Cluster
    from launch.multinode import HostLayout

    layout = HostLayout.single_node(Placement.from_hosts(parse_hostfile(hostfile)), {})
    cluster = Cluster(ClusterConfig(state_dir=str(tmp_path)), tmp_path / "c.json", layout)
    started = []
    cluster.spawn = lambda name, cmd, host="localhost": started.append(cmd)
    cluster.start_trainers()
    for cmd in started:
        assert ("torch.distributed.run" in cmd) == torchrun
        assert cmd[0] == sys.executable
        assert cmd[-4:] == ["-m", "actors.trainer.main", "--config", str(tmp_path / "c.json")]
