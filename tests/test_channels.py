"""Width reconciliation through grouped convs, splits, concatenations and reshapes: exact
widths, exact promises, exact outputs, and clean refusals, on tiny hand-built CNNs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from depthprune.channels.group import ChannelGroup, _components
from depthprune.depth import DepthPruner, count_params
from depthprune.errors import UserError


def run(model, x):
    with torch.no_grad():
        return model(x)


def prune_exactly(dp, unit):
    """Prune `unit`; the drop equals the promise and the step reports it."""
    promised = dp.promised_params(unit)
    before = count_params(dp.model)
    step = dp.prune(unit)
    assert before - count_params(dp.model) == promised == step.params_removed
    return step


def removed(step, path):
    """Channels the step's width ops removed from layer `path`."""
    return sorted(i for op in step.ops if op["op"] == "width" for p, _, idxs in op["items"] if p == path
                  for i in idxs)


def every_candidate_prunes_alone(dp, x):
    """Each listed candidate prunes inside a trial with its promise, keeps the output shape, and
    the model is bit-identical afterwards."""
    ref = run(dp.model, x)
    before = count_params(dp.model)
    cands = [c for c in dp.candidates() if c.candidate]
    for c in cands:
        with dp.trial([c.unit]):
            assert before - count_params(dp.model) == c.params_removed, c.unit
            assert run(dp.model, x).shape == ref.shape, c.unit
        assert torch.equal(run(dp.model, x), ref), c.unit
    return cands


# ------------------------------------------------------------------ grouped convolutions
class GroupedNet(nn.Module):
    """a (8->16) widens into a grouped conv b (16->16, 4 groups of 4); c narrows to 8."""

    def __init__(self, b_groups=4, b_out=16):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 1)
        self.a_bn = nn.BatchNorm2d(16)
        self.a_act = nn.ReLU()
        self.b = nn.Conv2d(16, b_out, 3, padding=1, groups=b_groups)
        self.b_bn = nn.BatchNorm2d(b_out)
        self.b_act = nn.ReLU()
        self.c = nn.Conv2d(b_out, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.a_act(self.a_bn(self.a(x)))
        x = self.b_act(self.b_bn(self.b(x)))
        return self.head(self.c(x))


def randomized_bn(net):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return net.eval()


@pytest.mark.unit
def test_width_through_grouped_conv_removes_whole_groups():
    torch.manual_seed(0)
    net = randomized_bn(GroupedNet())
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    dp = DepthPruner(net, (x,))
    step = prune_exactly(dp, "a")  # 8 of a's 16 outputs go: two whole groups of b
    gone = removed(step, "b")
    assert len(gone) == 8 and len({i // 4 for i in gone}) == 2
    b = dp.model.b
    assert (b.in_channels, b.out_channels, b.groups) == (8, 8, 2)
    assert tuple(b.weight.shape) == (8, 4, 3, 3) and dp.model.c.in_channels == 8
    kept = [i for i in range(16) if i not in gone]
    assert removed(step, "b_bn") == gone and removed(step, "c") == gone
    with torch.no_grad():  # a (with its BN and ReLU) is gone; b keeps its other two groups
        h = ref.stem(x)
        h = F.conv2d(h, ref.b.weight[kept], ref.b.bias[kept], padding=1, groups=2)
        bn = ref.b_bn
        h = F.batch_norm(h, bn.running_mean[kept], bn.running_var[kept], bn.weight[kept], bn.bias[kept], eps=bn.eps)
        want = ref.head(F.conv2d(torch.relu(h), ref.c.weight[:, kept], ref.c.bias))
        assert (dp.model(x) - want).abs().max() <= 1e-5


@pytest.mark.unit
def test_grouped_conv_widths_that_are_not_whole_groups_are_refused_in_the_listing():
    torch.manual_seed(0)

    class Narrow(GroupedNet):  # c: 16 -> 6 would remove 10 of b's channels, not whole groups of 4
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(16, 6, 1)
            self.head = nn.Conv2d(6, 5, 1)

    dp = DepthPruner(Narrow().eval(), (torch.randn(1, 3, 8, 8),))
    c = next(c for c in dp.candidates() if c.unit == "c")
    assert not c.candidate and "classes of 4" in c.reason
    assert dp.why_not("c") == c.reason
    every_candidate_prunes_alone(dp, torch.randn(1, 3, 8, 8))


@pytest.mark.unit
def test_grouped_conv_with_unequal_group_widths_is_a_barrier():
    torch.manual_seed(0)
    dp = DepthPruner(GroupedNet(b_groups=2, b_out=8).eval(), (torch.randn(1, 3, 8, 8),))
    c = next(c for c in dp.candidates() if c.unit == "a")
    assert not c.candidate and "different input and output widths" in c.reason
    every_candidate_prunes_alone(dp, torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------ chunk + concat (C2f)
class ChunkCatNet(nn.Module):
    """C2f's pattern: cv1 -> chunk(2) -> cat(y0, y1, m(y1)) -> cv2 (12 -> 8)."""

    def __init__(self, split_sizes=None):
        super().__init__()
        self.split_sizes = split_sizes
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cv1 = nn.Conv2d(8, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.cv2 = nn.Conv2d(12, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def pieces(self, y):
        return y.split(self.split_sizes, 1) if self.split_sizes else y.chunk(2, 1)

    def forward(self, x):
        y0, y1 = self.pieces(self.cv1(self.stem(x)))
        return self.head(self.cv2(torch.cat([y0, y1, self.m(y1)], 1)))


@pytest.mark.unit
def test_chunk_pieces_lose_the_same_offsets():
    torch.manual_seed(0)
    net = ChunkCatNet().eval()
    with torch.no_grad():  # m's outputs matter most: the pairs (y0[o], y1[o]) are removed
        net.m.bias.fill_(100.0)
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    dp = DepthPruner(net, (x,))
    step = prune_exactly(dp, "cv2")  # 4 of its 12 inputs: two offsets of both chunk pieces
    gone = removed(step, "cv1")
    offsets = sorted({i % 4 for i in gone})
    assert len(offsets) == 2 and gone == sorted(offsets + [o + 4 for o in offsets])
    kept = [o for o in range(4) if o not in offsets]
    assert removed(step, "m") == offsets  # m reads piece 1: its inputs lose the same offsets
    assert dp.model.cv1.out_channels == 4 and dp.model.m.in_channels == 2
    with torch.no_grad():
        y = ref.cv1(ref.stem(x))
        y0, y1 = y[:, kept], y[:, [4 + o for o in kept]]
        m = F.conv2d(y1, ref.m.weight[:, kept], ref.m.bias, padding=1)
        want = ref.head(torch.cat([y0, y1, m], 1))  # cv2, now square, is an identity
        assert (dp.model(x) - want).abs().max() <= 1e-5


@pytest.mark.unit
def test_fixed_size_split_is_refused_with_its_reason():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    dp = DepthPruner(ChunkCatNet(split_sizes=[4, 4]).eval(), (x,))
    c = next(c for c in dp.candidates() if c.unit == "cv2")
    # only m's four outputs could go alone, and one of them must stay
    assert not c.candidate and "a split into pieces of fixed sizes" in c.reason
    every_candidate_prunes_alone(dp, x)


class IntSplitNet(nn.Module):
    """``split(4)`` looks like ``chunk(2)`` in the trace but does not follow the width."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(3, 8, 1)
        self.u = nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        a, b = self.cv1(x).split(4, 1)
        return self.head(self.u(torch.cat([b, a * 2], 1)))


@pytest.mark.unit
def test_a_plan_that_breaks_the_model_is_rolled_back_and_never_offered():
    torch.manual_seed(0)
    net = IntSplitNet().eval()
    x = torch.randn(1, 3, 8, 8)
    ref, params = run(net, x), count_params(net)
    dp = DepthPruner(net, (x,))
    c = next(c for c in dp.candidates() if c.unit == "u")
    assert not c.candidate and "does not run" in c.reason
    with pytest.raises(UserError, match="does not run"):
        dp.prune("u")
    assert torch.equal(run(dp.model, x), ref) and count_params(dp.model) == params and not dp.steps
    assert dp.model.cv1.out_channels == 8 and dp.model.u.in_channels == 8


# ------------------------------------------------------------------ Fire modules
class FireNet(nn.Module):
    """SqueezeNet's Fire: squeeze, then cat(expand1x1, expand3x3) of the same input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.squeeze_act = nn.ReLU()
        self.e1 = nn.Conv2d(4, 8, 1)
        self.e1_act = nn.ReLU()
        self.e3 = nn.Conv2d(4, 8, 3, padding=1)
        self.e3_act = nn.ReLU()
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        s = self.squeeze_act(self.squeeze(self.stem(x)))
        return self.head(torch.cat([self.e1_act(self.e1(s)), self.e3_act(self.e3(s))], 1))


@pytest.mark.unit
@pytest.mark.parametrize("order", [["e1", "e3"], ["e3", "e1"]])
def test_fire_promise_equals_drop_through_empty_patching(order):
    torch.manual_seed(0)
    net = FireNet().eval()
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    dp = DepthPruner(net, (x,))
    prune_exactly(dp, order[0])
    assert dp.model.head.in_channels == 12
    step = prune_exactly(dp, order[1])  # cat(s, s): one operand becomes Empty
    assert any(op.get("with", {}).get("state") == "empty" for op in step.ops)
    assert dp.model.head.in_channels == 4
    # the head sees s once, through the columns of the operand that stayed
    kept = [i for i in range(8) if i not in removed(step, "head")]
    with torch.no_grad():
        s = ref.squeeze_act(ref.squeeze(ref.stem(x)))
        first = dp.steps[0]
        cols = [i for i in range(16) if i not in removed(first, "head")]
        w = ref.head.weight[:, cols][:, kept]
        want = F.conv2d(s, w, ref.head.bias)
        assert (dp.model(x) - want).abs().max() <= 1e-5


# ------------------------------------------------------------------ channel shuffle, dense blocks
class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models.shufflenetv2 import InvertedResidual
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1),
                                    InvertedResidual(16, 16, 1))
        self.narrow = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.narrow(self.blocks(self.stem(x))))


@pytest.mark.unit
def test_channel_shuffle_builds_and_refuses_widths_across_it():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    dp = DepthPruner(ShuffleNet().eval(), (x,))  # torch-pruning alone divides by zero here
    cands = {c.unit: c for c in dp.candidates()}
    # `narrow` (16 -> 8) would remove channels of the last block's shuffled output
    assert not cands["narrow"].candidate and "mixes channels" in cands["narrow"].reason
    assert cands["stem"].candidate and cands["blocks.1.branch2.0"].candidate
    done = every_candidate_prunes_alone(dp, x)
    assert len(done) == 10


@pytest.mark.unit
def test_dense_block_every_candidate_prunes_alone():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.densenet import _DenseBlock, _Transition
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                        _DenseBlock(num_layers=3, num_input_features=8, bn_size=2, growth_rate=4, drop_rate=0),
                        _Transition(20, 10), nn.Conv2d(10, 4, 1)).eval()
    assert tv is not None
    randomized_bn(net)
    x = torch.randn(1, 3, 16, 16)
    dp = DepthPruner(net, (x,))
    done = every_candidate_prunes_alone(dp, x)
    assert {c.unit for c in done} >= {"1.denselayer3.conv1", "1.denselayer3.conv2", "2.conv"}
    # a sequence: every step exact, the model keeps running
    for unit in ("1.denselayer2.conv1", "2.conv", "1.denselayer3.conv2", "1.denselayer1.conv1"):
        if dp.why_not(unit) is None:
            prune_exactly(dp, unit)
            assert run(dp.model, x).shape == (1, 4, 8, 8)


# ------------------------------------------------------------------ reshapes that keep channels
class NHWCNet(nn.Module):
    """ConvNeXt's pattern: Linear layers on a channels-last feature map (F.linear reshapes it)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.permute(0, 3, 1, 2))


class FlattenNet(nn.Module):
    """A conv widening into a flatten before a classifier: one channel is 16 features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.wide = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.wide(self.stem(x)), 1))


@pytest.mark.unit
def test_reshapes_that_keep_channels_are_not_barriers():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    dp = DepthPruner(NHWCNet().eval(), (x,))
    assert {c.unit for c in every_candidate_prunes_alone(dp, x)} >= {"fc1", "fc2"}
    net = FlattenNet().eval()
    ref = copy.deepcopy(net)
    dp = DepthPruner(net, (x,))
    step = prune_exactly(dp, "wide")  # 4 of its 8 channels go: 4 * 16 input features of fc
    gone = removed(step, "wide")
    assert removed(step, "fc") == sorted(j * 16 + t for j in gone for t in range(16))
    kept = [j for j in range(8) if j not in gone]
    cols = [j * 16 + t for j in kept for t in range(16)]
    with torch.no_grad():
        want = F.linear(torch.flatten(ref.stem(x), 1), ref.fc.weight[:, cols], ref.fc.bias)
        assert (dp.model(x) - want).abs().max() <= 1e-5


def test_channel_classes_and_visits_match_their_plain_definitions():
    """The vectorised pieces of `ChannelGroup` against their plain definitions on random data:
    the components of roots joined by shared groups equal a union-find's, and a revisited
    key's new codes (a bitmap once dense) equal a set difference."""
    gen = torch.Generator().manual_seed(0)
    for n, links in ((50, 30), (200, 150), (300, 40)):
        group = torch.randint(0, links, (2 * links,), generator=gen)
        root = torch.randint(0, n, (2 * links,), generator=gen)
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                x = parent[x]
            return x
        first: dict[int, int] = {}
        for g, r in zip(group.tolist(), root.tolist()):
            a, b = find(first.setdefault(g, r)), find(r)
            parent[max(a, b)] = min(a, b)
        assert _components(n, group, root, links).tolist() == [find(r) for r in range(n)]
    n, bits, seen = 64, {}, set()
    old = torch.tensor([], dtype=torch.long)
    for _ in range(40):  # dense enough to switch to the bitmap on the way
        codes = torch.unique(torch.randint(0, 100 * n, (600,), generator=gen))
        if len(old):
            new = ChannelGroup._new("k", codes, old, bits, n)
        else:
            new = codes
        assert sorted(new.tolist()) == sorted(set(codes.tolist()) - seen)
        seen |= set(new.tolist())
        old = torch.cat([old, new])
    assert "k" in bits
