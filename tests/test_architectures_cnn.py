"""Issue 13's contracts over the architecture zoo's CNNs and detectors (`tests/archs.py` CNNS and
YOLOS; the decoders and encoders are in test_architectures.py): every listed candidate prunes
alone with promise == drop and a model that runs with its output shapes; random prune sequences
hold the same at every step."""
import pytest

from archs import CNNS, SLOW, YOLOS
from battery import random_sequences, single_prunes, zoo, zoo_session as session

@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*CNNS, *YOLOS]))
def test_every_candidate_alone(name):
    arch, base, cands, report = session(name)
    assert cands, "no candidates listed"
    report.single_failures, report.single_ok = [], 0
    single_prunes(arch, base, cands, report)
    assert report.single_failures == []


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*CNNS, *YOLOS]))
def test_random_sequences(name):
    """3 seeds x 15 prunes on the quick models; on the heavy CNNs and YOLOs (`SLOW`: 27-76
    candidates, each step lists them all with their promises) one seed of 15 prunes: the other
    two walked the same few block kinds in another order and cost minutes each."""
    arch, base, _, report = session(name)
    report.sequence_failures = []
    random_sequences(arch, base, report, seeds=(0,) if name in SLOW else (0, 1, 2), steps=15)
    assert report.sequence_failures == []


