"""The ai-corona classifier, where its starting weights come from, and its class activation maps."""

RUNTIMES = ("openvino", "onnxruntime")  # fedct evaluate's compiled CPU paths, fastest first
ENGINES = ("auto", "eager", *RUNTIMES)  # what --engine takes (common/model/inference_engine.py)
