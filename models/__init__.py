"""What depthprune knows per model family, as data (installed with the wheel as ``depthprune.models``).

``recipes/*.yaml``: one recipe per family (candidate exclusions, selection defaults, efforts),
read by `depthprune.adapters.recipes`; ``yolov5n-synth/``: the shipped detector (model YAML +
fp16 safetensors + metadata, see `depthprune.adapters.yolo_weights`), made by
``bench/train_detector.py``. No code here: this file only makes the folder an importable
resource package.
"""
