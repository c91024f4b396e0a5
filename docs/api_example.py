import torch
from depthprune.adapters.load import calibration, load_model
from depthprune.depth import DepthPruner, count_params
from depthprune.importance import PruneConfig, prune_to_target
from depthprune.io.model_dir import load_pruned, save_pruned
from depthprune.depth.plan import fingerprint
from depthprune.sparsity import sparsify

# 1. Prune(f) by hand on any traced module
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                            torch.nn.ReLU(), torch.nn.Linear(16, 4))
dp = DepthPruner(model, (torch.randn(2, 16),))
for c in dp.candidates():
    print(c.unit, c.candidate, c.params_removed, c.reason)
with dp.trial(["2"]):                     # try, measure, roll back exactly
    print("inside the trial:", count_params(model))
step = dp.prune("2")                      # 32 -> 16 Linear replaced; widths reconciled
print(step.params_removed, model)

# 2. Score and prune to a target; save and reload without running code
lm = load_model("random-llama:4", progress=False)
fp = fingerprint(lm.model)
batches = calibration(lm, "shakespeare:calib", 4, 32)
# the selection; a field left out takes `depthprune prune`'s default (PruneConfig(target=0.25): the recipe's)
config = PruneConfig(target=0.25, score="angular", schedule="paper", granularity="fine", compensate=False)
pruner, outcome = prune_to_target(lm, config, batches, progress=False)
print(outcome.reached, outcome.params_after, [a["unit"] for a in outcome.applied])
save_pruned(pruner, "out/api-example", "random-llama:4", fp, lm=lm, force=True)  # self-contained
again, _ = load_pruned("out/api-example", progress=False)   # (LoadedModel, DepthPruner or None)
print(count_params(again.model) == outcome.params_after)

# 3. Sparsify the survivors
info = sparsify(lm.model, "stade", lm.example_inputs, lm.forward_fn, batches, sparsity=0.5, progress=False)
print(len(info["layers"]), "layers sparsified")
