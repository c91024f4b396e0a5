"""Issue 13's contracts over the architecture zoo's CNNs and detectors (`tests/archs.py` CNNS and
YOLOS; the decoders and encoders are in test_architectures.py): every listed candidate prunes
alone with promise == drop and a model that runs with its output shapes; random prune sequences
hold the same at every step."""
import pytest

from archs import CNNS, YOLOS
from battery import every_candidate_alone, zoo, zoo_random_sequences


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*CNNS, *YOLOS]))
def test_every_candidate_alone(name):
    every_candidate_alone(name)


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*CNNS, *YOLOS]))
def test_random_sequences(name):
    zoo_random_sequences(name)


