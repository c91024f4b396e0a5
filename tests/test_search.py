"""Bounded searches and FollowIdOperand on small hand-built graphs."""
import networkx as nx
import pytest

from depthprune.graph import backward_bounded_search, follow_identity_operand, forward_bounded_search

pytestmark = pytest.mark.unit


def graph(nodes, edges):
    g = nx.DiGraph()
    for n, kind in nodes.items():
        g.add_node(n, kind=kind, state="live")
    g.add_edges_from(edges)
    return g


@pytest.fixture
def glu():
    # x -> norm -> gate -> act -> mul <- up <- norm ; mul -> down -> add(x, .) -> norm2 -> next
    return graph(
        {"x": "arith", "norm": "norm", "gate": "transform", "act": "activation", "up": "transform",
         "mul": "arith", "down": "transform", "add": "arith", "norm2": "norm", "next": "transform"},
        [("x", "norm"), ("norm", "gate"), ("gate", "act"), ("act", "mul"), ("norm", "up"),
         ("up", "mul"), ("mul", "down"), ("down", "add"), ("x", "add"), ("add", "norm2"),
         ("norm2", "next")])


def test_forward_search_stops_at_transforms(glu):
    assert forward_bounded_search(glu, "gate") == {"act", "mul", "down"}
    assert forward_bounded_search(glu, "norm") == {"gate", "up"}
    assert forward_bounded_search(glu, "down") == {"add", "norm2", "next"}


def test_backward_search_stops_at_transforms(glu):
    assert backward_bounded_search(glu, "act") == {"gate"}
    assert backward_bounded_search(glu, "gate") == {"norm", "x"}
    assert backward_bounded_search(glu, "down") == {"mul", "act", "gate", "up"}


def test_identity_nodes_still_bound_the_search(glu):
    glu.nodes["gate"]["state"] = "identity"
    assert forward_bounded_search(glu, "norm") == {"gate", "up"}
    assert backward_bounded_search(glu, "act") == {"gate"}


def test_search_from_several_starts(glu):
    assert forward_bounded_search(glu, ["gate", "up"]) == {"act", "mul", "down"}


def test_attention_is_a_boundary():
    g = graph({"x": "arith", "ln": "norm", "attn": "attention", "add": "arith", "ln2": "norm",
               "fc": "transform"},
              [("x", "ln"), ("ln", "attn"), ("attn", "add"), ("x", "add"), ("add", "ln2"), ("ln2", "fc")])
    assert forward_bounded_search(g, "ln") == {"attn"}
    assert backward_bounded_search(g, "attn") == {"ln", "x"}
    assert forward_bounded_search(g, "attn") == {"add", "ln2", "fc"}


def test_follow_identity_operand(glu):
    # Residual operand that is the source itself: path of length zero.
    assert follow_identity_operand(glu, "x") == ("x", [])
    for n in ("norm", "up", "down"):
        glu.nodes[n]["state"] = "identity"
    # mul is live: origin of the down operand is mul, one identity on the way.
    assert follow_identity_operand(glu, "down") == ("mul", ["down"])
    glu.nodes["mul"].update(state="neutral", live_operand="up")
    assert follow_identity_operand(glu, "down") == ("x", ["down", "mul", "up", "norm"])


def test_identity_with_two_inputs_is_an_origin():
    g = graph({"a": "arith", "b": "arith", "t": "transform"}, [("a", "t"), ("b", "t")])
    g.nodes["t"]["state"] = "identity"
    assert follow_identity_operand(g, "t") == ("t", [])
