"""Topology arithmetic: pure, no processes."""

import pytest

from dapo_megatron.config import ParallelConfig
from dapo_megatron.parallel.topology import Topology, check_model_fits


def test_dp_is_world_over_model_parallel():
    assert Topology(world_size=8, tp=2, pp=2).dp == 2
    assert Topology(world_size=16, tp=2, pp=2, cp=2).dp == 2
    assert Topology(world_size=1).dp == 1
    t = Topology(world_size=12, tp=3, pp=2, vpp=2)
    assert (t.dp, t.model_parallel_size) == (2, 6)
    assert t.describe() == "world=12 tp=3 pp=2 vpp=2 cp=1 ep=1 dp=2"


def test_world_not_divisible_names_the_degrees():
    with pytest.raises(ValueError, match=r"world_size=6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        Topology(world_size=6, tp=2, pp=2)


def test_vpp_needs_pipeline():
    with pytest.raises(ValueError, match=r"vpp=2 needs pipeline parallelism"):
        Topology(world_size=2, tp=2, vpp=2)


@pytest.mark.parametrize("field", ["world_size", "tp", "pp", "vpp", "cp", "ep"])
def test_degrees_must_be_positive_integers(field):
    kwargs = {"world_size": 4, field: 0}
    with pytest.raises(ValueError, match=rf"Topology\.{field} must be an integer >= 1"):
        Topology(**kwargs)


def test_expert_parallel_must_divide_dp():
    assert Topology(world_size=8, tp=2, ep=4).dp == 4
    with pytest.raises(ValueError, match=r"ep=3 must divide the data-parallel degree dp=4"):
        Topology(world_size=8, tp=2, ep=3)


def test_from_config_maps_fields():
    cfg = ParallelConfig(tensor=2, pipeline=4, virtual_pipeline=2, context=1, expert=1)
    assert Topology.from_config(cfg, 16) == Topology(world_size=16, tp=2, pp=4, vpp=2, cp=1, ep=1)
    with pytest.raises(ValueError, match="not divisible"):
        Topology.from_config(cfg, 12)


def test_frozen():
    t = Topology(world_size=2, tp=2)
    with pytest.raises(AttributeError):
        t.tp = 1  # type: ignore[misc]


def test_check_model_fits_accepts_valid_split():
    check_model_fits(Topology(world_size=8, tp=2, pp=2, vpp=2), num_layers=8, num_attention_heads=8, num_query_groups=2)


def test_check_model_fits_heads_and_groups():
    topo = Topology(world_size=4, tp=4)
    with pytest.raises(ValueError) as err:
        check_model_fits(topo, num_layers=4, num_attention_heads=6, num_query_groups=2)
    msg = str(err.value)
    assert "num_attention_heads=6 is not divisible by tp=4" in msg
    assert "num_query_groups (key/value heads)=2 is not divisible by tp=4" in msg
    assert "num_layers" not in msg


def test_check_model_fits_gqa_ratio():
    with pytest.raises(ValueError, match=r"num_attention_heads=8 is not divisible by num_query_groups=3"):
        check_model_fits(Topology(world_size=1), num_layers=2, num_attention_heads=8, num_query_groups=3)


def test_check_model_fits_layers_over_virtual_chunks():
    topo = Topology(world_size=4, pp=4, vpp=2)
    check_model_fits(topo, num_layers=16, num_attention_heads=4, num_query_groups=4)
    with pytest.raises(ValueError, match=r"num_layers=12 is not divisible by pp\*vpp = 4\*2 = 8"):
        check_model_fits(topo, num_layers=12, num_attention_heads=4, num_query_groups=4)
