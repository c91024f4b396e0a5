import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="depthprune-tests-")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(_tmp, "yolo"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_tmp, "mpl"))
os.environ.setdefault("YOLO_VERBOSE", "False")
# one intra-op thread, here and in every subprocess the tests start (inherited): the models are
# tiny, and on a machine whose cores are shared a second OpenMP thread spins waiting for a core
# (a forward pass took 5-8x longer with 2 threads than with 1 while anything else ran)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged real SmolLM2-135M (loaded once per session; copy before mutating)."""
    from depthprune.adapters.load import load_model
    return load_model("smollm2-135m")


def tiny_bert(layers: int):
    """A random BERT-style encoder built from a config (a model the project was not written for)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval(), {"input_ids": torch.randint(0, 100, (1, 8))}
