"""Which rank feeds which colocated server when the servers sit on several nodes (pure plan), and how a
rank tells that a server runs on its own node."""

import socket

import pytest

from dapo_megatron.controller.node_senders import NodeRole, RankPlace, plan_node_senders, server_is_local


def _places(world: int, tp: int, pp: int, ranks_per_node: int, servers_per_node: int):
    """megatron's rank order (TP fastest, then DP, PP outermost) on nodes of ``ranks_per_node``
    consecutive ranks, each node holding ``servers_per_node`` servers."""
    dp = world // (tp * pp)
    out = []
    for rank in range(world):
        node = rank // ranks_per_node
        servers = frozenset(range(node * servers_per_node, (node + 1) * servers_per_node))
        out.append(RankPlace(rank=rank, stage=rank // (tp * dp), replica=rank // tp % dp, tp_rank=rank % tp,
                             servers=servers))  # fmt: skip
    return out


def _urls(n: int):
    return [f"http://10.0.0.{i}:30000" for i in range(n)]


def test_tp_across_two_nodes_each_rank_feeds_its_own_server():
    """TP2 with one rank per node (the CI's namespace job): both ranks sit in replica 0, and each is the
    sender for the server beside it; nothing is relayed at PP1."""
    places = _places(2, tp=2, pp=1, ranks_per_node=1, servers_per_node=1)
    plan = plan_node_senders(places, _urls(2), pp=1)
    assert plan.senders == {0: (0,), 1: (1,)}
    assert plan.replicas == {0}
    assert [plan.role(p) for p in places] == [NodeRole(True, False, True), NodeRole(True, False, True)]


def test_the_7b_recipe_one_replica_per_node_gathers():
    """TP4 PP1 DP8 on 4 nodes of 8 ranks with 4 TP2 servers each (examples/dapo_qwen2.5_7b.yaml): each
    node's first replica (ranks 0, 8, 16, 24) gathers and its TP rank 0 feeds that node's servers; the
    other replica on each node does nothing."""
    places = _places(32, tp=4, pp=1, ranks_per_node=8, servers_per_node=4)
    plan = plan_node_senders(places, _urls(16), pp=1)
    assert plan.senders == {0: (0, 1, 2, 3), 8: (4, 5, 6, 7), 16: (8, 9, 10, 11), 24: (12, 13, 14, 15)}
    assert plan.replicas == {0, 2, 4, 6}
    roles = [plan.role(p) for p in places]
    assert [r for r, role in enumerate(roles) if role.gathers] == [*range(0, 4), *range(8, 12), *range(16, 20),
                                                                   *range(24, 28)]  # fmt: skip
    assert not any(role.relays for role in roles)


def test_the_32b_recipe_relays_the_other_stage_over_the_pipeline_group():
    """TP8 PP2 DP8 on 16 nodes (examples/dapo_qwen2.5_32b.yaml): stage 0 is ranks 0-63 (nodes 0-7),
    stage 1 ranks 64-127 (nodes 8-15), so no node holds both stages. Node n's sender is its first rank;
    replica 0's pipeline group (ranks 0 and 64) carries the other stage to nodes 0 and 8, and so on:
    one replica per node pair gathers and one pipeline group per replica relays."""
    places = _places(128, tp=8, pp=2, ranks_per_node=8, servers_per_node=2)
    plan = plan_node_senders(places, _urls(32), pp=2)
    assert sorted(plan.senders) == [8 * n for n in range(16)]
    assert plan.senders[64] == (16, 17)  # node 8's servers, fed by stage 1's rank of replica 0
    assert plan.replicas == set(range(8)) and plan.pipelines == {(d, 0) for d in range(8)}
    roles = {p.rank: plan.role(p) for p in places}
    assert roles[0] == roles[64] == NodeRole(gathers=True, relays=True, emits=True)
    assert roles[1] == NodeRole(gathers=True, relays=False, emits=False)  # TP peer: joins the all-gather only


def test_pp1_has_nothing_to_relay_even_with_a_pipeline_group_listed():
    places = [RankPlace(0, 0, 0, 0, frozenset({0}))]
    assert plan_node_senders(places, _urls(1), pp=1).role(places[0]) == NodeRole(True, False, True)


def test_a_server_with_no_trainer_rank_on_its_node_is_refused_by_name():
    places = _places(2, tp=1, pp=1, ranks_per_node=1, servers_per_node=1)
    with pytest.raises(ValueError, match=r"no trainer rank runs on the node of the server http://10\.0\.0\.2:30000"):
        plan_node_senders(places, _urls(3), pp=1)


def test_server_is_local_reads_the_machines_own_addresses():
    """Loopback names trainer rank 0's node (by host name); another address is local only when an
    interface of this machine holds it. 192.0.2.1 is TEST-NET-1, never assigned."""
    me = socket.gethostname()
    assert server_is_local("http://127.0.0.1:30000", me)
    assert not server_is_local("http://127.0.0.1:30000", me + "-elsewhere")
    assert not server_is_local("http://192.0.2.1:30000", me)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet: asks for the route, i.e. an address of this machine
        own = s.getsockname()[0]
    assert server_is_local(f"http://{own}:30000", me + "-elsewhere")
    with pytest.raises(ValueError, match="cannot read a host"):
        server_is_local("not a url", me)
